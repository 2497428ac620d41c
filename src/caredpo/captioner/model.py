"""Our video captioner: frozen grid features -> MLP projector -> visual tokens -> LM (+ LoRA).

Sequence seen by the LM (ChatML for SmolLM2):

    <|im_start|>user\\n [V visual tokens] \\nDescribe the video in one sentence.<|im_end|>\\n
    <|im_start|>assistant\\n  caption tokens  <|im_end|>

The part before the caption (the *prefix*, P = head + V + tail tokens) runs once per distinct
video and its KV cache serves every caption of that video (`prefix.PrefixCaptioner`, shared with
the HF backend); the LM head (576 x 49152 for SmolLM2) runs only where a caption token is predicted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from .. import precision
from ..folders import staged_dir
from ..io import write_json
from .adapter import add_lora, load_adapter, save_adapter
from .lm import load_lm
from .prefix import PrefixCaptioner

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
            raise ValueError(
                f"CaptionerConfig.chat_format must be one of {sorted(CHAT_FORMATS)}, got {self.chat_format!r}"
            )
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
    def from_dict(cls, d: dict) -> CaptionerConfig:
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


class VideoCaptioner(PrefixCaptioner):
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
        if precision.resolve(config.precision) == "bf16":  # every LM pass runs under autocast()
            precision.store_frozen_linears_in_bf16(self.base_lm)

    def _ids(self, text: str) -> torch.Tensor:
        return torch.tensor(self.tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)

    @property
    def end_id(self) -> int:
        """EOS closes a caption (appended to captions scored, fills rows that stopped)."""
        return self.eos_id

    @property
    def stop_ids(self) -> list[int]:
        return [self.eos_id]

    @property
    def base_lm(self):
        """The causal LM (with LoRA layers injected when there are any)."""
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    @property
    def device(self) -> torch.device:
        return self.projector.fc1.weight.device

    def autocast(self):
        """The context every LM pass runs in (bf16 autocast or none; see caredpo.precision)."""
        return precision.autocast(self.config.precision, self.device)

    # ------------------------------------------------------------ trainable parts

    def set_trainable(self, projector: bool = True, lora: bool = True) -> None:
        """LM base weights always stay frozen; choose whether projector and LoRA train."""
        self.projector.requires_grad_(projector)
        for name, p in self.lm.named_parameters():
            p.requires_grad_(lora and "lora_" in name)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # ------------------------------------------------------------ prefix (see prefix.PrefixCaptioner)

    def visual_input(self, features: torch.Tensor) -> torch.Tensor:
        """Check shape, subsample frames evenly to num_frames, move to the model's device."""
        cfg = self.config
        if features.dim() != 4 or features.shape[2:] != (cfg.grid_cells, cfg.input_dim):
            raise ValueError(
                f"features must be [B, T, {cfg.grid_cells}, {cfg.input_dim}] ({cfg.feature_dim} CNN + "
                f"{cfg.colour_bins} colour channels), got {tuple(features.shape)}"
            )
        T = features.shape[1]
        if T < cfg.num_frames:
            raise ValueError(f"features have {T} frames, the captioner needs {cfg.num_frames}")
        if T > cfg.num_frames:
            features = features[:, torch.linspace(0, T - 1, cfg.num_frames).round().long()]
        return features.to(self.device, torch.float32)

    def prefix_embeds(self, features: torch.Tensor) -> torch.Tensor:
        """[B, T, G, C] -> [B, P, d]: head text, visual tokens, tail text (prompt)."""
        vis = self.projector(self.visual_input(features))
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

    def extend(self, ids: torch.Tensor, cache, offset: int) -> torch.Tensor:
        """Text tokens ids [R, L] after the cached ones -> hidden [R, L, d] (positions follow the cache)."""
        return self.decoder(inputs_embeds=self.embed(ids), cache=cache, use_cache=True).last_hidden_state

    # ------------------------------------------------------------ save / load

    def save_pretrained(self, path: str | Path, save_base: bool | None = None) -> Path:
        """config.json + projector.safetensors + adapter/ (peft); the tiny LM's base weights too
        (`lm/`), since they are random. Written to a temp folder and renamed into place."""
        from safetensors.torch import save_file

        with staged_dir(path) as tmp:
            write_json(tmp / "config.json", {"format": FORMAT, "captioner": asdict(self.config)})
            state = {k: v.detach().cpu().contiguous() for k, v in self.projector.state_dict().items()}
            save_file(state, str(tmp / "projector.safetensors"), metadata={"format": "pt"})
            if self.config.lora_layers != 0:
                save_adapter(self.lm, tmp)
            if save_base if save_base is not None else self.config.lm == "tiny":
                self.base_lm.save_pretrained(tmp / "lm", state_dict=self._base_state())
                self.tokenizer.save_pretrained(tmp / "lm")
        return Path(path)

    def _base_state(self) -> dict:
        """Base LM weights under plain HF names (LoRA wrappers stripped, adapters dropped)."""
        out = {}
        for k, v in self.base_lm.state_dict().items():
            if "lora_" in k:
                continue
            out[k.replace(".base_layer.", ".")] = v.float() if v.dtype == torch.bfloat16 else v
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path, lm: str | None = None, device: str | torch.device = "cpu"):
        """Load a saved captioner; `lm` overrides where the base LM comes from."""
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
            load_adapter(model.lm, path)
        return model.to(device)


def _add_lora(lm, cfg: CaptionerConfig):
    if cfg.lora_layers == 0:
        return lm
    n_layers = lm.config.num_hidden_layers
    k = n_layers if cfg.lora_layers == -1 else min(cfg.lora_layers, n_layers)
    return add_lora(
        lm,
        cfg.seed,
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_targets),
        layers_to_transform=list(range(n_layers - k, n_layers)),
        task_type="CAUSAL_LM",
    )
