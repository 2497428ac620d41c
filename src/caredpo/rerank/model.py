"""The MLLM reranker: one LM pass over [visual tokens][auxiliary caption][query] -> a relevance score.

The sequence (ChatML for SmolLM2), each span's role embedding added to its input embeddings:

    <|im_start|>user\\n [V visual tokens: video] [\\n caption: caption] [\\n query: query]
    \\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n   -> the score is read at the last position

The caption and the query are plain text with nothing but their order between them, so in the
`caption` variant the LM must tell them apart by position; `caption_role` adds a learnt (video,
caption, query) table, zero at the start, so at step 0 it scores exactly like `caption`.

The prefix [head][visual][caption] is the same for every query scored against one candidate: it runs
once per candidate (candidates batched, left-padded) and its KV cache is extended with each query
(right-padded) in `score_pairs`; positions and the attention mask make that equal to one unpadded
pass per (candidate, query) (tests/test_rerank.py).

The reranker starts from a captioner, usually the SFT one, which already reads visual tokens: our
`VideoCaptioner` (projector, SmolLM2, LoRA) or a Hugging Face video MLLM (`HFVideoCaptioner`:
Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision), seen through `backbone.py`; training moves its LoRA, the role
table and the score head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import precision
from ..folders import staged_dir
from ..io import read_json, write_json
from ..records import DataError
from .backbone import BACKBONES, backbone

FORMAT = "caredpo-reranker-v1"
ROLES = ("video", "caption", "query")  # rows of the role table
# variant -> (reads the auxiliary caption, role embeddings)
VARIANTS = {"no_caption": (False, False), "caption": (True, False), "caption_role": (True, True)}


def _yes_no(model: Reranker, h: Tensor) -> Tensor:
    """log-odds of "Yes" over "No" as the next token (LamRA's rerank form): [R, d] -> [R]."""
    w = model.backbone.lm_head.weight[model.answer_ids]  # [2, d]
    logits = h @ w.T.to(h.dtype)
    return logits[:, 0] - logits[:, 1]


def _linear(model: Reranker, h: Tensor) -> Tensor:
    """A linear head on the last hidden state: [R, d] -> [R]."""
    return model.head(h)[:, 0]


SCORES: dict[str, Callable[[Reranker, Tensor], Tensor]] = {"yes_no": _yes_no, "linear": _linear}


@dataclass(frozen=True)
class RerankerConfig:
    variant: str = "caption_role"  # VARIANTS key: no_caption | caption | caption_role
    score: str = "yes_no"  # SCORES key: "yes_no" (answer-token log-odds) or "linear" (a head)
    prompt: str = "Does the text describe the video? Answer Yes or No."
    answers: tuple[str, str] = ("Yes", "No")  # the yes_no score's tokens (first token of each)
    max_caption_tokens: int = 48  # caption tokens kept (longer ones are cut)
    max_query_tokens: int = 48  # query tokens kept
    precision: str = "fp32"  # "auto" | "fp32" | "bf16" (caredpo.precision)
    seed: int = 0  # init of the linear head

    def __post_init__(self) -> None:
        object.__setattr__(self, "answers", tuple(self.answers))
        if self.variant not in VARIANTS:
            raise ValueError(f"RerankerConfig.variant must be one of {sorted(VARIANTS)}, got {self.variant!r}")
        if self.score not in SCORES:
            raise ValueError(f"RerankerConfig.score must be one of {sorted(SCORES)}, got {self.score!r}")
        if min(self.max_caption_tokens, self.max_query_tokens) < 1:
            raise ValueError("RerankerConfig: max_caption_tokens and max_query_tokens must be >= 1")
        if len(self.answers) != 2 or len(set(self.answers)) != 2:
            raise ValueError(f"RerankerConfig.answers must be two different words, got {self.answers}")
        precision.check(self.precision, "RerankerConfig")

    @property
    def use_caption(self) -> bool:
        return VARIANTS[self.variant][0]

    @property
    def roles(self) -> bool:
        return VARIANTS[self.variant][1]

    @classmethod
    def from_dict(cls, d: dict) -> RerankerConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class Reranker(nn.Module):
    def __init__(self, config: RerankerConfig, captioner):
        super().__init__()
        self.config, self.captioner = config, captioner
        self.backbone = backbone(captioner)
        if self.backbone.bf16_weights and precision.resolve(config.precision, captioner.device) != "bf16":
            raise ValueError(
                "RerankerConfig.precision resolves to fp32, but the captioner keeps its frozen weights in bf16 "
                f"(CaptionerConfig.precision={captioner.config.precision!r}): give both the same precision"
            )
        d = captioner.embed.embedding_dim
        self.roles = nn.Embedding(len(ROLES), d)
        nn.init.zeros_(self.roles.weight)  # step 0 = the model without roles
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.head = nn.Linear(d, 1) if config.score == "linear" else None
        self.tail_ids = self._ids(self.backbone.tail.format(prompt=config.prompt))
        self.sep_ids = self._ids("\n")
        answers = [self._ids(a) for a in config.answers]
        if answers[0][:1] == answers[1][:1]:
            raise ValueError(f"RerankerConfig.answers {config.answers} start with the same token")
        self.register_buffer("answer_ids", torch.tensor([a[0] for a in answers]), persistent=False)
        self.pad_id = self.backbone.pad_id
        self.to(captioner.device)  # the new parts (roles, head) join the captioner's device

    def _ids(self, text: str) -> list[int]:
        return self.backbone.tokenizer(text, add_special_tokens=False).input_ids

    @property
    def device(self) -> torch.device:
        return self.captioner.device

    def set_trainable(self) -> None:
        """LoRA, the role table (caption_role) and the linear head train; base LM and projector stay."""
        self.backbone.set_trainable()
        self.roles.requires_grad_(self.config.roles)
        if self.head is not None:
            self.head.requires_grad_(True)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # ------------------------------------------------------------ sequences

    def _role(self, name: str) -> Tensor:
        """[d] role embedding (zeros for a variant without roles)."""
        w = self.roles.weight[ROLES.index(name)]
        return w if self.config.roles else torch.zeros_like(w)

    def _span(self, text: str | None, limit: int) -> list[int]:
        """\\n + the text's first `limit` tokens; [] for no text."""
        return self.sep_ids + self._ids(text)[:limit] if text else []

    def prefixes(self, features: Tensor, captions: Sequence[str | None]) -> tuple[Tensor, Tensor]:
        """U visual inputs + U captions -> left-padded prefix embeddings [U, P, d] and mask [U, P]."""
        bb = self.backbone
        vis = bb.visual(features) + self._role("video")  # [U, V, d]
        head, close = bb.embed(bb.head_ids), bb.embed(bb.close_ids)
        texts = captions if self.config.use_caption else [None] * len(vis)
        rows = []
        for u, text in enumerate(texts):
            ids = torch.tensor(self._span(text, self.config.max_caption_tokens), dtype=torch.long, device=self.device)
            caption = (bb.embed(ids) + self._role("caption")).to(head.dtype)
            rows.append(torch.cat([head, vis[u].to(head.dtype), close, caption]))
        embeds = nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_side="left")
        lengths = torch.tensor([len(r) for r in rows], device=self.device)
        mask = torch.arange(embeds.shape[1], device=self.device)[None] >= (embeds.shape[1] - lengths)[:, None]
        return embeds, mask.long()

    def query_ids(self, queries: Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
        """Right-padded [R, L] ids of (\\n query, tail), their mask and a query-role mask (both [R, L])."""
        spans = [self._span(q, self.config.max_query_tokens) for q in queries]
        if not all(spans):
            raise ValueError("every query must be a non-empty string")
        L = max(len(s) for s in spans) + len(self.tail_ids)
        ids = torch.full((len(spans), L), self.pad_id, dtype=torch.long)
        mask, is_query = torch.zeros(len(spans), L, dtype=torch.long), torch.zeros(len(spans), L, dtype=torch.bool)
        for r, s in enumerate(spans):
            ids[r, : len(s) + len(self.tail_ids)] = torch.tensor(s + self.tail_ids)
            mask[r, : len(s) + len(self.tail_ids)] = 1
            is_query[r, : len(s)] = True
        return ids.to(self.device), mask.to(self.device), is_query.to(self.device)

    # ------------------------------------------------------------ scoring

    def score_pairs(
        self, features: Tensor, captions: Sequence[str | None], queries: Sequence[str], candidate: Tensor
    ) -> Tensor:
        """Relevance [R] of query r against candidate `candidate[r]` (an index into the U rows of
        features / captions). Each candidate's prefix runs once; differentiable."""
        from transformers import DynamicCache

        if len(captions) != len(features):
            raise ValueError(f"{len(captions)} captions for {len(features)} videos")
        if len(queries) != len(candidate):
            raise ValueError(f"{len(queries)} queries for {len(candidate)} candidate indices")
        bb, candidate = self.backbone, torch.as_tensor(candidate, device=self.device)
        with precision.autocast(self.config.precision, self.device):
            embeds, pmask = self.prefixes(features, captions)
            cache = DynamicCache(config=bb.cache_config)
            bb.decoder(
                inputs_embeds=embeds,
                attention_mask=pmask,
                position_ids=bb.positions((pmask.cumsum(1) - 1).clamp_min(0)),
                cache=cache,
                use_cache=True,
            )
            cache.batch_select_indices(candidate)
            ids, qmask, is_query = self.query_ids(queries)
            pmask = pmask[candidate]
            emb = bb.embed(ids) + (is_query[..., None] * self._role("query")).to(embeds.dtype)
            positions = pmask.sum(1, keepdim=True) + torch.arange(ids.shape[1], device=self.device)
            h = bb.decoder(
                inputs_embeds=emb,
                attention_mask=torch.cat([pmask, qmask], 1),
                position_ids=bb.positions(positions),
                cache=cache,
                use_cache=True,
            ).last_hidden_state
            last = h[torch.arange(len(ids), device=self.device), qmask.sum(1) - 1]  # [R, d]
            return SCORES[self.config.score](self, last.float()).float()

    def score(self, features: Tensor, captions: Sequence[str | None], queries: Sequence[str]) -> Tensor:
        """Relevance [B] of query b against video b with caption b."""
        return self.score_pairs(features, captions, queries, torch.arange(len(queries)))

    # ------------------------------------------------------------ save / load

    def save_pretrained(self, path: str | Path) -> Path:
        """config.json + reranker.safetensors (role table, head) + captioner/ (the backbone's own
        save: projector + LoRA, or for an HF backbone its base model's path + LoRA)."""
        from safetensors.torch import save_file

        with staged_dir(path) as tmp:
            meta = {"format": FORMAT, "backbone": self.backbone.kind, "reranker": asdict(self.config)}
            write_json(tmp / "config.json", meta)
            state = {
                k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if not k.startswith("captioner.")
            }
            save_file(state, str(tmp / "reranker.safetensors"), metadata={"format": "pt"})
            self.captioner.save_pretrained(tmp / "captioner")
        return Path(path)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None) -> Reranker:
        from safetensors.torch import load_file

        path = Path(path)
        meta = read_json(path / "config.json") if (path / "config.json").exists() else {}
        if meta.get("format") != FORMAT:
            raise DataError(f"{path / 'config.json'}: not a caredpo reranker (format {meta.get('format')!r})")
        kind = meta.get("backbone", "caredpo")
        if kind not in BACKBONES:
            raise DataError(f"{path / 'config.json'}: unknown backbone {kind!r} (known: {sorted(BACKBONES)})")
        model = cls(RerankerConfig.from_dict(meta["reranker"]), BACKBONES[kind].load(path / "captioner", device))
        missing, unexpected = model.load_state_dict(load_file(str(path / "reranker.safetensors")), strict=False)
        if unexpected or any(not k.startswith("captioner.") for k in missing):
            raise DataError(f"{path / 'reranker.safetensors'}: weights do not fit the model ({unexpected or missing})")
        return model.to(model.captioner.device)
