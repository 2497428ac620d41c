"""Our video captioner: frozen grid features -> MLP projector -> visual tokens -> LM (+ LoRA).

Sequence seen by the LM (ChatML for SmolLM2):

    <|im_start|>user\\n [V visual tokens] \\nDescribe the video in one sentence.<|im_end|>\\n
    <|im_start|>assistant\\n  caption tokens  <|im_end|>

The part before the caption (the *prefix*, P = head + V + tail tokens) is the same for every
caption of a video, so both `generate` and `logprob` run it once per distinct video and reuse its
KV cache for all captions of that video (n samples, or the K candidates of a DPO group). The LM head
(576 x 49152 for SmolLM2) is applied only at positions that predict a caption token.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from .. import precision
from ..io import write_json
from .batching import caption_ids, caption_logprobs, distinct_rows
from .lm import load_lm
from .sampling import sample_loop, video_uniforms

FORMAT = "caredpo-captioner-v1"
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Text around the visual tokens: (head, tail) with {prompt} filled in.
CHAT_FORMATS = {
    "chatml": ("<|im_start|>user\n", "\n{prompt}<|im_end|>\n<|im_start|>assistant\n"),
    "plain": ("", "\n{prompt}\n"),
}


@dataclass(frozen=True)
class CaptionerConfig:
    lm: str = "smollm2"  # "smollm2" (converted from the wheel's GGUF), "tiny" (tests) or a local HF folder
    cache_dir: str | None = None  # where the converted SmolLM2 lives (None: $CAREDPO_CACHE or ~/.cache/caredpo)
    feature_dim: int = 1280  # CNN channels of a grid cell
    colour_bins: int = 0  # then this many colour-histogram channels per cell (features.py; 0 = none)
    num_frames: int = 8  # T used; more frames in the input are subsampled evenly
    grid_cells: int = 4  # G: spatial cells per frame (2x2); visual tokens = num_frames * grid_cells
    temporal_delta: bool = True  # also feed x - mean_t(x): makes motion direction linearly visible
    clip_tokens: int = 0  # M extra visual tokens, each read from the whole clip (every frame and cell)
    clip_dim: int = 32  # width each cell is reduced to before the clip tokens' MLP reads all T*G of them
    projector_hidden: int = 1024  # hidden width of the 2-layer MLP projector
    lora_layers: int = 8  # LoRA on the top k decoder layers; -1 = all layers, 0 = no LoRA
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = LLAMA_TARGETS  # module names inside a decoder layer
    prompt: str = "Describe the video in one sentence."
    chat_format: str = "chatml"  # key of CHAT_FORMATS
    precision: str = "fp32"  # "auto" | "fp32" | "bf16" (autocast; weights stay fp32): caredpo.precision
    seed: int = 0  # init of the projector (and of the tiny LM)

    def __post_init__(self) -> None:
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        for name in ("feature_dim", "num_frames", "grid_cells", "projector_hidden", "lora_rank", "clip_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"CaptionerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.colour_bins < 0:
            raise ValueError(f"CaptionerConfig.colour_bins must be >= 0, got {self.colour_bins}")
        if self.clip_tokens < 0:
            raise ValueError(f"CaptionerConfig.clip_tokens must be >= 0, got {self.clip_tokens}")
        if self.lora_layers < -1:
            raise ValueError(f"CaptionerConfig.lora_layers must be -1 (all), 0 (none) or k > 0, got {self.lora_layers}")
        if self.chat_format not in CHAT_FORMATS:
            raise ValueError(f"CaptionerConfig.chat_format must be one of {sorted(CHAT_FORMATS)}, got {self.chat_format!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"CaptionerConfig.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        precision.check(self.precision, "CaptionerConfig")

    @property
    def input_dim(self) -> int:
        """C of the visual input [B, T, G, C]: CNN channels, then colour bins."""
        return self.feature_dim + self.colour_bins

    @property
    def num_visual_tokens(self) -> int:
        return self.num_frames * self.grid_cells + self.clip_tokens

    @classmethod
    def from_dict(cls, d: dict) -> "CaptionerConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class Projector(nn.Module):
    """[B, T, G, C] grid features -> [B, T*G + M, d] visual token embeddings.

    T*G frame tokens: a 2-layer MLP on each (frame, cell). M clip tokens (`clip_tokens`): each cell
    is reduced to `clip_dim` channels, the T*G of them are concatenated in (frame, cell) order and a
    2-layer MLP maps that to M tokens. A frame token sees one frame, so the LM has to compare tokens
    across time to tell left-to-right from right-to-left; a clip token carries the trajectory itself,
    the way a linear probe on the concatenated grid sequence reads direction."""

    def __init__(self, cfg: CaptionerConfig, d_model: int, target_rms: float):
        super().__init__()
        self.temporal_delta = cfg.temporal_delta
        self.parts = (cfg.feature_dim, cfg.colour_bins) if cfg.colour_bins else (cfg.feature_dim,)
        in_dim = cfg.input_dim * (2 if cfg.temporal_delta else 1)
        self.gain = nn.Parameter(torch.ones(in_dim))  # like a LayerNorm gain, learns the delta's weight
        self.fc1 = nn.Linear(in_dim, cfg.projector_hidden)
        self.fc2 = nn.Linear(cfg.projector_hidden, d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(cfg.num_visual_tokens, d_model))  # (frame, cell), then clip
        self.clip_tokens = cfg.clip_tokens
        if cfg.clip_tokens:
            self.clip_reduce = nn.Linear(in_dim, cfg.clip_dim)
            self.clip_fc1 = nn.Linear(cfg.num_frames * cfg.grid_cells * cfg.clip_dim, cfg.projector_hidden)
            self.clip_fc2 = nn.Linear(cfg.projector_hidden, cfg.clip_tokens * d_model)
        self._match_scale(in_dim, target_rms)

    def _frame_mlp(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(h)))

    def _clip_mlp(self, h: torch.Tensor) -> torch.Tensor:
        """[B, T, G, in_dim] -> [B, M, d]."""
        flat = self.clip_reduce(h).flatten(1)  # [B, T*G*clip_dim]
        return self.clip_fc2(nn.functional.gelu(self.clip_fc1(flat))).reshape(h.shape[0], self.clip_tokens, -1)

    @torch.no_grad()
    def _match_scale(self, in_dim: int, target_rms: float) -> None:
        """Start with visual tokens as loud as word embeddings (RMS), so the LM is not swamped."""
        heads = [(self._frame_mlp(torch.randn(256, in_dim)), self.fc2)]
        if self.clip_tokens:
            cells = self.pos.shape[0] - self.clip_tokens
            heads.append((self._clip_mlp(torch.randn(16, cells, 1, in_dim)), self.clip_fc2))
        for out, fc in heads:
            fc.weight.mul_(target_rms / out.pow(2).mean().sqrt().clamp_min(1e-8))
            fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, G, C = x.shape
        # Each part (CNN channels, colour histogram) is RMS-normalised over its channels per cell,
        # so neither's units matter; its delta is scaled by the same number, keeping its relative
        # size (a still clip's delta stays ~0 instead of being blown up to unit noise).
        normed, deltas = [], []
        for part in x.split(self.parts, dim=-1):
            scale = part.pow(2).mean(-1, keepdim=True).add(1e-6).rsqrt()
            normed.append(part * scale)
            if self.temporal_delta:
                deltas.append((part - part.mean(1, keepdim=True)) * scale)
        h = torch.cat(normed + deltas, -1) * self.gain  # [B, T, G, in_dim]
        out = self._frame_mlp(h).reshape(B, T * G, -1)
        if self.clip_tokens:
            out = torch.cat([out, self._clip_mlp(h)], 1)
        return out + self.pos


class VideoCaptioner(nn.Module):
    """Implements `caredpo.captioner.base.Captioner` (generate / logprob) on grid features."""

    def __init__(self, config: CaptionerConfig = CaptionerConfig(), lm=None, tokenizer=None):
        super().__init__()
        self.config = config
        if lm is None:
            lm, tokenizer = load_lm(config.lm, config.cache_dir, seed=config.seed)
        self.tokenizer = tokenizer
        lm.requires_grad_(False)
        self.lm = _add_lora(lm, config)
        base = self.base_lm
        self.decoder, self.lm_head = base.get_decoder(), base.get_output_embeddings()
        self.embed = base.get_input_embeddings()
        rms = self.embed.weight.detach().pow(2).mean().sqrt().item()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.projector = Projector(config, self.embed.embedding_dim, rms)
        head, tail = CHAT_FORMATS[config.chat_format]
        self.register_buffer("head_ids", self._ids(head), persistent=False)
        self.register_buffer("tail_ids", self._ids(tail.format(prompt=config.prompt)), persistent=False)
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id

    def _ids(self, text: str) -> torch.Tensor:
        return torch.tensor(self.tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)

    @property
    def base_lm(self):
        """The causal LM (with LoRA layers injected when there are any)."""
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    @property
    def device(self) -> torch.device:
        return self.projector.fc1.weight.device

    # ------------------------------------------------------------ trainable parts

    def set_trainable(self, projector: bool = True, lora: bool = True) -> None:
        """LM base weights always stay frozen; choose whether projector and LoRA train."""
        self.projector.requires_grad_(projector)
        for name, p in self.lm.named_parameters():
            p.requires_grad_(lora and "lora_" in name)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # ------------------------------------------------------------ prefix

    def _frames(self, features: torch.Tensor) -> torch.Tensor:
        """Check shape, subsample frames evenly to num_frames, move to the model's device."""
        cfg = self.config
        if features.dim() != 4 or features.shape[2:] != (cfg.grid_cells, cfg.input_dim):
            raise ValueError(f"features must be [B, T, {cfg.grid_cells}, {cfg.input_dim}] ({cfg.feature_dim} CNN + "
                             f"{cfg.colour_bins} colour channels), got {tuple(features.shape)}")
        T = features.shape[1]
        if T < cfg.num_frames:
            raise ValueError(f"features have {T} frames, the captioner needs {cfg.num_frames}")
        if T > cfg.num_frames:
            features = features[:, torch.linspace(0, T - 1, cfg.num_frames).round().long()]
        return features.to(self.device, torch.float32)

    def prefix_embeds(self, features: torch.Tensor) -> torch.Tensor:
        """[B, T, G, C] -> [B, P, d]: head text, visual tokens, tail text (prompt)."""
        vis = self.projector(self._frames(features))
        B = vis.shape[0]
        head = self.embed(self.head_ids).expand(B, -1, -1)
        tail = self.embed(self.tail_ids).expand(B, -1, -1)
        return torch.cat([head, vis.to(head.dtype), tail], 1)

    def prefill(self, features: torch.Tensor):
        """Run the prefix once: (hidden state at its last position [B, d], KV cache)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.base_lm.config)
        out = self.decoder(inputs_embeds=self.prefix_embeds(features), cache=cache, use_cache=True)
        return out.last_hidden_state[:, -1], cache

    # ------------------------------------------------------------ log-probs

    def encode_captions(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Caption token ids + EOS, right-padded: ids [N, L] and mask [N, L] (bool)."""
        ids, mask = caption_ids(self.tokenizer, captions, self.eos_id, self.pad_id)
        return ids.to(self.device), mask.to(self.device)

    def token_logprobs(self, features: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """log p of each caption token (EOS included) given video + prompt: ([N, L], mask [N, L]).

        Rows with identical features share one prefix pass. Right padding needs no attention
        mask: with causal attention a real token never sees the pads after it."""
        if features.shape[0] != len(captions):
            raise ValueError(f"{features.shape[0]} videos but {len(captions)} captions")
        ids, mask = self.encode_captions(captions)
        uniq, inv = distinct_rows(features)
        with self.autocast():
            last, cache = self.prefill(uniq)
            if uniq.shape[0] != features.shape[0] or not torch.equal(inv, torch.arange(len(inv))):
                cache.batch_select_indices(inv.to(self.device))
                last = last[inv.to(self.device)]
            hidden = last[:, None]  # position P-1 predicts caption token 0
            if ids.shape[1] > 1:  # caption tokens 0..L-2 predict tokens 1..L-1
                out = self.decoder(inputs_embeds=self.embed(ids[:, :-1]), cache=cache, use_cache=True)
                hidden = torch.cat([hidden, out.last_hidden_state.to(hidden.dtype)], 1)
            return caption_logprobs(self.lm_head, hidden, ids, mask), mask

    def autocast(self):
        """The context every LM pass runs in (bf16 autocast or none; see caredpo.precision)."""
        return precision.autocast(self.config.precision, self.device)

    def logprob(self, features: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """Summed log p(caption + EOS | video, prompt) -> [B]. Differentiable."""
        lp, _ = self.token_logprobs(features, captions)
        return lp.sum(1)

    def nll(self, features: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """Mean next-token loss over all caption tokens of the batch (the SFT loss)."""
        lp, mask = self.token_logprobs(features, captions)
        return -lp.sum() / mask.sum()

    # ------------------------------------------------------------ sampling

    seeds_per_video = True  # generate() takes one seed per video (see Captioner.generate)

    @torch.inference_mode()
    def generate(self, features: torch.Tensor, n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                 max_new_tokens: int = 32, seed: int | Sequence[int] | None = None) -> list[list[str]]:
        """n captions per video; temperature 0 = greedy. One prefix pass per video, its KV cache
        repeated n times; finished rows leave the batch. Same seed -> same captions; one seed per
        video: a video's captions do not depend on the other videos of the batch."""
        B = features.shape[0]
        tokens = self.generate_ids(features, n, temperature, top_p, max_new_tokens, seed)
        texts = [self._decode(row) for row in tokens.tolist()]
        return [texts[i * n:(i + 1) * n] for i in range(B)]

    @torch.inference_mode()
    def generate_ids(self, features: torch.Tensor, n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                     max_new_tokens: int = 32, seed: int | Sequence[int] | None = None) -> torch.Tensor:
        """Token ids [B * n, max_new_tokens] (rows of a video adjacent; EOS-filled after the end)."""
        if n < 1 or max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
            raise ValueError("need n >= 1, max_new_tokens >= 1, temperature >= 0, 0 < top_p <= 1")
        per_video = seed is not None and not isinstance(seed, int)
        if per_video and len(seed) != features.shape[0]:
            raise ValueError(f"{len(seed)} seeds for {features.shape[0]} videos")
        gen = None if seed is None or per_video else torch.Generator(self.device).manual_seed(seed)
        table = video_uniforms(seed, n, max_new_tokens).to(self.device) if per_video else None
        with self.autocast():
            h, cache = self.prefill(features)
            if n > 1:
                cache.batch_repeat_interleave(n)
                h = h.repeat_interleave(n, 0)
            return sample_loop(self, h, cache, features.shape[0] * n, temperature, top_p, max_new_tokens, gen, table)

    def _decode(self, row: list[int]) -> str:
        if self.eos_id in row:
            row = row[: row.index(self.eos_id)]
        return self.tokenizer.decode(row, skip_special_tokens=True).strip()

    # ------------------------------------------------------------ save / load

    def save_pretrained(self, path: str | Path, save_base: bool | None = None) -> Path:
        """config.json + projector.safetensors + adapter/ (peft); the tiny LM's base weights too
        (`lm/`), since they are random. Written to a temp folder and renamed into place."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
        try:
            write_json(tmp / "config.json", {"format": FORMAT, "captioner": asdict(self.config)})
            state = {k: v.detach().cpu().contiguous() for k, v in self.projector.state_dict().items()}
            save_file(state, str(tmp / "projector.safetensors"), metadata={"format": "pt"})
            if self.config.lora_layers != 0:
                self.lm.save_pretrained(tmp / "adapter")
            if save_base if save_base is not None else self.config.lm == "tiny":
                self.base_lm.save_pretrained(tmp / "lm", state_dict=self._base_state())
                self.tokenizer.save_pretrained(tmp / "lm")
            _replace_dir(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path

    def _base_state(self) -> dict:
        """Base LM weights under plain HF names (LoRA wrappers stripped, adapters dropped)."""
        out = {}
        for k, v in self.base_lm.state_dict().items():
            if "lora_" in k:
                continue
            out[k.replace(".base_layer.", ".")] = v
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path, lm: str | None = None, device: str | torch.device = "cpu"):
        """Load a saved captioner; `lm` overrides where the base LM comes from."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        from ..io import read_json
        from ..records import DataError

        path = Path(path)
        if not (path / "config.json").exists() and (path / "model" / "config.json").exists():
            path = path / "model"  # an SFT / DPO run folder
        meta = read_json(path / "config.json")
        if meta.get("format") != FORMAT:
            raise DataError(f"{path / 'config.json'}: not a caredpo captioner (format {meta.get('format')!r})")
        cfg = CaptionerConfig.from_dict(meta["captioner"])
        base, tok = None, None
        if lm is None and (path / "lm" / "config.json").exists():
            base, tok = load_lm(str(path / "lm"))
        elif lm is not None:
            base, tok = load_lm(lm, cfg.cache_dir, seed=cfg.seed)
        model = cls(cfg, base, tok)
        model.projector.load_state_dict(load_file(str(path / "projector.safetensors")))
        if cfg.lora_layers != 0:
            res = set_peft_model_state_dict(model.lm, load_file(str(path / "adapter" / "adapter_model.safetensors")))
            if getattr(res, "unexpected_keys", None):
                raise DataError(f"{path / 'adapter'}: adapter does not fit the model ({res.unexpected_keys[:3]} ...)")
        return model.to(device)


def _add_lora(lm, cfg: CaptionerConfig):
    if cfg.lora_layers == 0:
        return lm
    from peft import LoraConfig, get_peft_model

    n_layers = lm.config.num_hidden_layers
    k = n_layers if cfg.lora_layers == -1 else min(cfg.lora_layers, n_layers)
    lora = LoraConfig(
        r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_targets), layers_to_transform=list(range(n_layers - k, n_layers)),
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return get_peft_model(lm, lora)


def _replace_dir(src: Path, dst: Path) -> None:
    """Move a finished folder into place, replacing an older one (rename is atomic per folder)."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.rename(dst, old)
    os.rename(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
