"""Real Hugging Face video MLLMs (Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision) behind the `Captioner` protocol.

The model is loaded from a local folder (`from_pretrained(path)`); its family comes from
`config.model_type` (see `hf_families.FAMILIES`). Visual input (`features` in the protocol) is raw
frames, uint8 [B, T, 3, H, W] as `VideoFrames(ids)` returns them (float in [0, 1] works too), so the
DG-DPO trainer's `features(ids)` / `feats[rows]` work unchanged. Sequence seen by the LM:

    <chat head> [N visual tokens from the vision tower] <prompt, assistant turn>  caption  <|im_end|>

As in our own captioner (`model.py`; the algorithm is `prefix.PrefixCaptioner`), the prefix is run
once per distinct clip (the vision tower under no_grad: it is frozen), its KV cache is reused for
every caption of that clip, and the LM head is applied only where a caption token is predicted.
LoRA (peft) sits on the language model's attention projections only; everything else stays
frozen. bf16 on CUDA, float32 on CPU.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from ..folders import staged_dir
from ..io import write_json
from ..records import DataError
from . import hf_families as fam
from .adapter import add_lora, save_adapter
from .adapter import load_adapter as load_lora  # the method below takes the plain name
from .prefix import PrefixCaptioner

FORMAT = "caredpo-hf-captioner-v1"
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class HFCaptionerConfig:
    model_path: str  # local folder of the base model: config.json, weights, tokenizer files
    num_frames: int = 8  # T frames per clip (Qwen pads T up to a multiple of its temporal patch, 2)
    frame_size: int = 0  # square frame side S fed to the vision tower; 0: the family's default
    prompt: str = "Describe the video in one sentence."  # the user turn's text after the video
    fps: float = 2.0  # Qwen2.5-VL only: frames per second of the sampled frames (temporal RoPE spacing)
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ATTENTION_TARGETS  # module names inside the LM's attention blocks
    dtype: str = "auto"  # key of DTYPES; auto = bfloat16 on CUDA, float32 on CPU
    seed: int = 0  # LoRA initialisation

    def __post_init__(self) -> None:
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        checks = {
            "model_path": bool(self.model_path),
            "num_frames": self.num_frames >= 1,
            "frame_size": self.frame_size >= 0,
            "fps": self.fps > 0,
            "lora_rank": self.lora_rank >= 1,
            "lora_dropout": 0.0 <= self.lora_dropout < 1.0,
            "dtype": self.dtype in DTYPES,
            "lora_targets": bool(self.lora_targets) and all(re.fullmatch(r"\w+", t) for t in self.lora_targets),
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"HFCaptionerConfig.{name} is invalid: {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, d: dict) -> HFCaptionerConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class HFVideoCaptioner(PrefixCaptioner):
    """Implements `caredpo.captioner.base.Captioner` on a local HF video MLLM (+ LoRA)."""

    def __init__(self, config: HFCaptionerConfig, device: str | torch.device | None = None, model=None, tokenizer=None):
        super().__init__()
        path = Path(config.model_path).expanduser()
        self.config, self.spec = config, fam.family(path)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if model is None:
            model, tokenizer = _load(path, self.spec, config, device)
        model.requires_grad_(False)
        self.lm = _add_lora(model, config).to(device)
        base = self.lm.get_base_model()
        self.hf_config, self.inner = base.config, base.model
        self.text, self.embed = base.model.language_model, base.get_input_embeddings()
        self.lm_head = base.get_output_embeddings()
        self.tokenizer = tokenizer
        self.frame_size = config.frame_size or self.spec.default_size(self.hf_config)
        problem = self.spec.size_problem(self.hf_config, self.frame_size)
        if problem:
            raise DataError(f"{path}: frame_size {self.frame_size} {problem}")
        self.mean, self.std = fam.norm_stats(path, self.spec)
        self._build_prompt(path)
        self._set_special_ids(path)

    def _token_id(self, token: str, path: Path) -> int:
        tid = self.tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == self.tokenizer.unk_token_id:
            raise DataError(f"{path}: the tokenizer has no {token} token")
        return tid

    def _build_prompt(self, path: Path) -> None:
        """Prompt ids (head, N video tokens, tail) and their positions, fixed by (T, S)."""
        spec, cfg = self.spec, self.hf_config
        vid = getattr(cfg, spec.video_token_attr)
        if self._token_id(spec.video_token, path) != vid:
            raise DataError(
                f"{path}: tokenizer maps {spec.video_token} to "
                f"{self._token_id(spec.video_token, path)}, the config says {vid}"
            )
        text = spec.template.replace("{video}", spec.video_token).replace("{prompt}", self.config.prompt)
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        if ids.count(vid) != 1:
            raise DataError(f"{path}: the prompt must hold {spec.video_token} once, got {ids.count(vid)}")
        cut = ids.index(vid)
        self.num_video_tokens = spec.num_video_tokens(cfg, self.config.num_frames, self.frame_size)
        full = torch.tensor([ids[:cut] + [vid] * self.num_video_tokens + ids[cut + 1 :]], device=self.device)
        self.register_buffer("head_ids", full[0, :cut], persistent=False)
        self.register_buffer("tail_ids", full[0, cut + self.num_video_tokens :], persistent=False)
        pos = spec.prefix_positions(self.inner, full, cfg, self.config.num_frames, self.frame_size, self.config.fps)
        pos = torch.arange(full.shape[1], device=self.device)[None] if pos is None else pos  # [(3,) 1, P]
        self.register_buffer("prefix_pos", pos, persistent=False)
        self.next_pos = int(pos[..., -1].max()) + 1  # the first caption token's (text) position

    def _set_special_ids(self, path: Path) -> None:
        """End-of-turn (appended to captions), stop tokens of sampling, padding."""
        self.end_id = self._token_id(self.spec.end_token, path)
        eos = self.tokenizer.eos_token_id
        self.stop_ids = sorted({self.end_id} | ({eos} if eos is not None else set()))
        pad = self.tokenizer.pad_token_id
        self.pad_id = self.end_id if pad is None else pad

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def set_trainable(self, lora: bool = True) -> None:
        """The base model always stays frozen; LoRA trains or not."""
        for name, p in self.lm.named_parameters():
            p.requires_grad_(lora and "lora_" in name)

    def frames(self, dataset, max_cached: int = 256) -> VideoFrames:
        """The visual-input callable for `dataset`'s videos at this model's T and S."""
        return VideoFrames(dataset, self.config.num_frames, self.frame_size, max_cached)

    # ------------------------------------------------------------ prefix

    def visual_input(self, features: torch.Tensor) -> torch.Tensor:
        """Check [B, T, 3, H, W], subsample frames evenly to num_frames."""
        T = self.config.num_frames
        if features.dim() != 5 or features.shape[2] != 3:
            raise ValueError(f"frames must be [B, T, 3, H, W], got {tuple(features.shape)}")
        if features.shape[1] < T:
            raise ValueError(f"frames have {features.shape[1]} frames, the captioner needs {T}")
        if features.shape[1] > T:
            features = features[:, torch.linspace(0, features.shape[1] - 1, T).round().long()]
        return features

    def video_embeds(self, frames: torch.Tensor) -> torch.Tensor:
        """Clips [U, T, 3, H, W] (as `visual_input` returns them) -> visual tokens [U, N, d]."""
        x = fam.normalise(frames.to(self.device), self.frame_size, self.mean, self.std).to(self.dtype)
        with torch.no_grad():  # the vision tower is frozen: keep no activations for it
            vis = self.spec.video_embeds(self.inner, self.spec.vision_inputs(self.hf_config, x))
        if vis.shape[1] != self.num_video_tokens:
            raise RuntimeError(
                f"vision tower gave {vis.shape[1]} tokens a clip, the prompt holds {self.num_video_tokens}"
            )
        return vis.to(self.dtype)

    def prefill(self, frames: torch.Tensor):
        """Run the prefix of distinct clips [U, T, 3, H, W]: (last hidden state [U, d], KV cache)."""
        from transformers import DynamicCache

        vis = self.video_embeds(frames)
        U = vis.shape[0]
        emb = torch.cat(
            [
                self.embed(self.head_ids).expand(U, -1, -1),
                vis,
                self.embed(self.tail_ids).expand(U, -1, -1),
            ],
            1,
        )
        pos = self.prefix_pos.expand(*self.prefix_pos.shape[:-2], U, -1)
        cache = DynamicCache(config=self.text.config)
        out = self.text(inputs_embeds=emb, position_ids=pos, cache=cache, use_cache=True)
        return out.last_hidden_state[:, -1], cache

    def extend(self, ids: torch.Tensor, cache, offset: int) -> torch.Tensor:
        """Text tokens ids [R, L] after the prefix (+ offset earlier ones) -> hidden [R, L, d]."""
        pos = (self.next_pos + offset + torch.arange(ids.shape[1], device=self.device)).expand(ids.shape[0], -1)
        return self.text(input_ids=ids, position_ids=pos, cache=cache, use_cache=True).last_hidden_state

    # ------------------------------------------------------------ save / load

    def save_pretrained(self, path: str | Path) -> Path:
        """config.json (our format: the base model's path + settings) + adapter/ (peft LoRA).
        The base weights are not copied: they stay where config.model_path points."""
        with staged_dir(path) as tmp:
            write_json(
                tmp / "config.json",
                {"format": FORMAT, "model_type": self.hf_config.model_type, "captioner": asdict(self.config)},
            )
            save_adapter(self.lm, tmp)
        return Path(path)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, adapter: str | Path | None = None, device: str | torch.device | None = None, **overrides
    ) -> HFVideoCaptioner:
        """A local HF model folder (fresh LoRA, or `adapter`), or a folder we saved (base + its
        adapter; a DPO run folder with model/ inside works too). overrides: HFCaptionerConfig fields."""
        path = Path(path).expanduser()
        if _saved_meta(path / "model"):
            path = path / "model"
        meta = _saved_meta(path)
        if meta:
            cfg = HFCaptionerConfig.from_dict({**meta["captioner"], **overrides})
            adapter = adapter or path / "adapter"
        else:
            cfg = HFCaptionerConfig(model_path=str(path.resolve()), **overrides)  # saved: absolute
        model = cls(cfg, device=device)
        if adapter is not None:
            model.load_adapter(adapter)
        return model

    def load_adapter(self, path: str | Path) -> None:
        """LoRA weights from a peft adapter folder (or a saved captioner folder's adapter/)."""
        load_lora(self.lm, path)


# ---------------------------------------------------------------- visual input


class VideoFrames:
    """ids -> uint8 frames [B, T, 3, S, S], decoded with PyAV (`caredpo.video.read_frames`: T
    uniformly sampled frames, centre crop, resize). The last `max_cached` clips stay in memory
    (per process; 8 x 3 x 336 x 336 bytes = 2.7 MB a clip), since DPO revisits the same videos."""

    def __init__(self, dataset, num_frames: int, size: int, max_cached: int = 256):
        if num_frames < 1 or size < 1 or max_cached < 0:
            raise ValueError("VideoFrames: need num_frames >= 1, size >= 1, max_cached >= 0")
        self.dataset, self.num_frames, self.size, self.max_cached = dataset, num_frames, size, max_cached
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def clip(self, vid: str) -> torch.Tensor:
        from ..video import read_frames

        if vid in self._cache:
            self._cache.move_to_end(vid)
            return self._cache[vid]
        path = self.dataset.video_path(self.dataset.by_id[vid])
        x = torch.from_numpy(read_frames(path, self.num_frames, self.size)).permute(0, 3, 1, 2)  # [T, 3, S, S]
        if self.max_cached:
            self._cache[vid] = x
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        return x

    def __call__(self, ids: Sequence[str]) -> torch.Tensor:
        return torch.stack([self.clip(v) for v in ids])


# ---------------------------------------------------------------- helpers


def _saved_meta(path: Path) -> dict | None:
    f = path / "config.json"
    if not f.is_file():
        return None
    meta = json.loads(f.read_text())
    return meta if meta.get("format") == FORMAT else None


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if DTYPES[name] is not None:
        return DTYPES[name]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _load(path: Path, spec: fam.FamilySpec, cfg: HFCaptionerConfig, device: torch.device):
    """(model, tokenizer) from the local folder; weights go straight to a CUDA device."""
    import transformers
    from transformers import AutoTokenizer

    model_cls = getattr(transformers, spec.model_class)
    extra = {"device_map": str(device)} if device.type == "cuda" else {}
    model = model_cls.from_pretrained(path, dtype=_dtype(cfg.dtype, device), **extra)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def _add_lora(model, cfg: HFCaptionerConfig):
    """LoRA on the language model's attention projections only (the regex keeps the vision
    tower's own q/k/v projections out)."""
    targets = rf".*language_model.*\.({'|'.join(cfg.lora_targets)})"
    return add_lora(
        model,
        cfg.seed,
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
    )
