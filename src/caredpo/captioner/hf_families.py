"""Per-family pieces of the Hugging Face video-MLLM captioner (`caredpo.captioner.hf`).

A family (keyed by `config.model_type`) says which transformers class to load, how its chat prompt
looks, how many visual tokens a clip becomes, how raw frames turn into the vision tower's input, and
how the prompt's positions are laid out. All pixel work is plain torch: the HF image/video
processors import torchvision, which this project does not install.

    qwen2_vl / qwen2_5_vl   frames [B, T, 3, S, S] -> patches [B * t*h*w, 3*tp*p*p] + grid (t, h, w),
                            t = ceil(T / tp), h = w = S / p; t*h*w / merge**2 visual tokens a clip,
                            3-D (M-RoPE) positions from the model's own `get_rope_index`
    llava_onevision         frames [B, T, 3, S, S] as they are (S = the vision tower's image_size);
                            T * ceil(S/p / 2)**2 + 1 visual tokens (2x2-pooled patches + one newline)
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..records import DataError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)

QWEN_TEMPLATE = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|>{video}<|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n"
)
# llava-hf's chat_template.json for the OneVision (Qwen2 LM) checkpoints, one user turn with a video.
LLAVA_OV_TEMPLATE = "<|im_start|>user {video}\n{prompt}<|im_end|><|im_start|>assistant\n"


@dataclass(frozen=True)
class FamilySpec:
    """What differs between families. Functions take the model's (top-level) HF config."""

    model_class: str  # transformers class name, imported when a model is loaded
    template: str  # the chat text up to the assistant's answer; {video} = one video token, {prompt}
    video_token: str  # placeholder token; the prompt holds it once per visual token
    video_token_attr: str  # config attribute holding the placeholder's id
    end_token: str  # closes the assistant turn: appended to every caption, stops sampling
    mean: tuple[float, float, float]  # pixel normalisation when the folder's preprocessor config has none
    std: tuple[float, float, float]
    default_size: Callable[[object], int]  # frame side S in pixels when the user gives none
    size_problem: Callable[[object, int], str | None]  # why S does not fit the model (None: fits)
    num_video_tokens: Callable[[object, int, int], int]  # (config, T, S) -> visual tokens of a clip
    vision_inputs: Callable[[object, torch.Tensor], dict]  # (config, normalised frames) -> tower kwargs
    video_embeds: Callable[[object, dict], torch.Tensor]  # (inner model, kwargs) -> [B, N, d]
    prefix_positions: Callable[..., torch.Tensor | None]  # (inner model, ids [1, P], config, T, S, fps)


# ---------------------------------------------------------------- Qwen2-VL / Qwen2.5-VL


def _qwen_sizes(cfg) -> tuple[int, int, int]:
    v = cfg.vision_config
    return int(v.patch_size), int(v.temporal_patch_size), int(v.spatial_merge_size)


def _qwen_grid(cfg, T: int, S: int) -> tuple[int, int, int]:
    """(t, h, w) patch grid of a T-frame S x S clip (frames padded up to a multiple of tp)."""
    p, tp, _ = _qwen_sizes(cfg)
    return math.ceil(T / tp), S // p, S // p


def _qwen_size_problem(cfg, S: int) -> str | None:
    p, _, m = _qwen_sizes(cfg)
    return None if S % (p * m) == 0 else f"must be a multiple of patch_size * spatial_merge_size = {p * m}"


def _qwen_tokens(cfg, T: int, S: int) -> int:
    t, h, w = _qwen_grid(cfg, T, S)
    return t * h * w // _qwen_sizes(cfg)[2] ** 2


def qwen_patchify(x: torch.Tensor, patch: int, temporal_patch: int, merge: int) -> tuple[torch.Tensor, list[int]]:
    """[B, T, C, H, W] -> ([B * t*h*w, C*tp*p*p], [t, h, w]) in the Qwen2-VL processor's order:
    patches grouped by merge window (t, h/m, w/m, m, m), each patch flattened as (C, tp, p, p),
    which is what the vision tower's Conv3d patch embedding reads."""
    B, T, C, H, W = x.shape
    if pad := -T % temporal_patch:  # repeat the last frame, as the processor does
        x = torch.cat([x, x[:, -1:].expand(-1, pad, -1, -1, -1)], 1)
    t, h, w = x.shape[1] // temporal_patch, H // patch, W // patch
    x = x.reshape(B, t, temporal_patch, C, h // merge, merge, patch, w // merge, merge, patch)
    x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)  # B, t, h/m, w/m, m, m, C, tp, p, p
    return x.reshape(B * t * h * w, C * temporal_patch * patch * patch), [t, h, w]


def _qwen_vision_inputs(cfg, x: torch.Tensor) -> dict:
    p, tp, m = _qwen_sizes(cfg)
    patches, grid = qwen_patchify(x, p, tp, m)
    return {
        "pixel_values_videos": patches,
        "video_grid_thw": torch.tensor([grid] * x.shape[0], dtype=torch.long, device=x.device),
    }


def _qwen_video_embeds(inner, kw: dict) -> torch.Tensor:
    out = inner.get_video_features(kw["pixel_values_videos"], kw["video_grid_thw"])
    return torch.stack(list(out.pooler_output))  # one [N, d] per clip, all the same N


def _qwen_positions(inner, ids: torch.Tensor, cfg, T: int, S: int, fps: float) -> torch.Tensor:
    """[3, 1, P] M-RoPE positions of the prompt, from the model's own rule."""
    video = ids == cfg.video_token_id
    kw = {"video_grid_thw": torch.tensor([_qwen_grid(cfg, T, S)], device=ids.device)}
    if cfg.model_type == "qwen2_5_vl":  # temporal spacing: seconds per temporal patch
        kw["second_per_grid_ts"] = torch.tensor([_qwen_sizes(cfg)[1] / fps], device=ids.device)
    pos, _ = inner.get_rope_index(ids, video.int() * 2, **kw)  # token type 2 = video
    return pos


def _qwen_spec(model_class: str) -> FamilySpec:
    return FamilySpec(
        model_class=model_class,
        template=QWEN_TEMPLATE,
        video_token="<|video_pad|>",
        video_token_attr="video_token_id",
        end_token="<|im_end|>",
        mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD,
        # 336 = what the Qwen processor's min_pixels (128 * 28 * 28) makes of a small square clip
        default_size=lambda cfg: 12 * _qwen_sizes(cfg)[0] * _qwen_sizes(cfg)[2],
        size_problem=_qwen_size_problem,
        num_video_tokens=_qwen_tokens,
        vision_inputs=_qwen_vision_inputs,
        video_embeds=_qwen_video_embeds,
        prefix_positions=_qwen_positions,
    )


# ---------------------------------------------------------------- LLaVA-OneVision


def _llava_side(cfg) -> int:
    """Patches per side after the vision tower (before the model's 2x2 bilinear pooling)."""
    return cfg.vision_config.image_size // cfg.vision_config.patch_size


def _llava_size_problem(cfg, S: int) -> str | None:
    need = cfg.vision_config.image_size
    return None if S == need else f"must equal the vision tower's image_size {need}"


def _llava_tokens(cfg, T: int, S: int) -> int:
    return T * math.ceil(_llava_side(cfg) / 2) ** 2 + 1  # + the image_newline after the last frame


def _llava_video_embeds(inner, kw: dict) -> torch.Tensor:
    return inner.get_video_features(kw["pixel_values_videos"]).pooler_output  # [B, N, d]


LLAVA_ONEVISION = FamilySpec(
    model_class="LlavaOnevisionForConditionalGeneration",
    template=LLAVA_OV_TEMPLATE,
    video_token="<video>",
    video_token_attr="video_token_id",
    end_token="<|im_end|>",
    mean=SIGLIP_MEAN,
    std=SIGLIP_STD,
    default_size=lambda cfg: cfg.vision_config.image_size,
    size_problem=_llava_size_problem,
    num_video_tokens=_llava_tokens,
    vision_inputs=lambda cfg, x: {"pixel_values_videos": x},
    video_embeds=_llava_video_embeds,
    prefix_positions=lambda *a: None,
)  # plain 1-D positions

FAMILIES: dict[str, FamilySpec] = {
    "qwen2_vl": _qwen_spec("Qwen2VLForConditionalGeneration"),
    "qwen2_5_vl": _qwen_spec("Qwen2_5_VLForConditionalGeneration"),
    "llava_onevision": LLAVA_ONEVISION,
}


# ---------------------------------------------------------------- shared helpers


def model_type(path: Path) -> str:
    """config.json's model_type of a local model folder (read as JSON: no model code imported)."""
    cfg = path / "config.json"
    if not cfg.exists():
        raise FileNotFoundError(f"{path}: not a local Hugging Face model folder (no config.json)")
    return json.loads(cfg.read_text()).get("model_type", "")


def family(path: Path) -> FamilySpec:
    mt = model_type(path)
    if mt not in FAMILIES:
        raise DataError(
            f"{path}: model_type {mt!r} is not a supported video MLLM (supported: {', '.join(sorted(FAMILIES))})"
        )
    return FAMILIES[mt]


def norm_stats(path: Path, spec: FamilySpec) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) from the folder's video/image preprocessor config (plain JSON), else the family's."""
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        f = path / name
        if f.exists():
            d = json.loads(f.read_text())
            if "image_mean" in d and "image_std" in d:
                return tuple(d["image_mean"]), tuple(d["image_std"])
    return spec.mean, spec.std


def normalise(frames: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """uint8 [0, 255] or float [0, 1] frames [B, T, 3, H, W] -> float32 [B, T, 3, size, size],
    resized (bicubic, antialiased, like the HF processors) only when needed, then (x - mean) / std."""
    x = frames.float() / 255.0 if frames.dtype == torch.uint8 else frames.float()
    B, T, C, H, W = x.shape
    if (H, W) != (size, size):
        x = (
            F.interpolate(
                x.reshape(B * T, C, H, W), size=(size, size), mode="bicubic", antialias=True, align_corners=False
            )
            .clamp(0, 1)
            .reshape(B, T, C, size, size)
        )
    m = torch.tensor(mean, device=x.device).view(1, 1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 1, 3, 1, 1)
    return (x - m) / s
