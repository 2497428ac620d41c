"""Scoring API shared by evaluation and the preference stage.

    sim = similarity_matrix(model, queries, video_feats, captions)   # [Q, C] cosine
    scorer = Scorer(model); scorer.similarity(...)                    # same, query vectors cached

Candidates and queries are each encoded once, in length-sorted batches (less padding on CPU),
without gradients and in eval mode. A `Scorer` caches query vectors by text, so the preference
stage can score many caption sets against the same reference sentences for one encoder pass;
it is only valid while the model's weights do not change (make a new one after a training step).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from ..io import read_json
from ..records import DataError, Dataset
from .model import Retriever
from .search import SearchConfig, embedding_metrics

CANDIDATE_CHUNK = 8192  # videos encoded per Scorer.candidates call in evaluate (bounds feature memory)


class GlobalFeatures(Protocol):
    def global_feats(self, ids: Sequence[str]) -> torch.Tensor: ...  # float32 [B, T, 1280]


def _length_order(texts: Sequence[str]) -> list[int]:
    return sorted(range(len(texts)), key=lambda i: len(texts[i]))


class Scorer:
    def __init__(self, model: Retriever, batch_size: int = 64):
        self.model, self.batch_size = model, batch_size
        self._query_cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def queries(self, texts: Sequence[str]) -> torch.Tensor:
        """[Q, H] unit vectors; each distinct text is encoded once per Scorer."""
        todo = sorted({t for t in texts if t not in self._query_cache}, key=len)
        was = self.model.training
        self.model.eval()
        for i in range(0, len(todo), self.batch_size):
            chunk = todo[i : i + self.batch_size]
            self._query_cache.update(zip(chunk, self.model.encode_queries(chunk).cpu()))
        self.model.train(was)
        if not texts:
            return torch.empty(0, self.model.hidden_size)
        return torch.stack([self._query_cache[t] for t in texts])

    @torch.no_grad()
    def candidates(self, video_feats: torch.Tensor, captions: Sequence[str | None] | None = None) -> torch.Tensor:
        """[C, T, F] features (+ C captions or None) -> [C, H] unit vectors."""
        n = len(video_feats)
        if captions is not None and len(captions) != n:
            raise ValueError(f"{len(captions)} captions for {n} videos")
        caps = list(captions) if captions is not None else [None] * n
        order = _length_order([c or "" for c in caps])
        out = torch.empty(n, self.model.hidden_size)
        was = self.model.training
        self.model.eval()
        for i in range(0, n, self.batch_size):
            idx = order[i : i + self.batch_size]
            out[idx] = self.model.encode_candidates(video_feats[idx], [caps[j] for j in idx]).cpu()
        self.model.train(was)
        return out

    def similarity(
        self, queries: Sequence[str], video_feats: torch.Tensor, captions: Sequence[str | None] | None = None
    ) -> torch.Tensor:
        return self.queries(queries) @ self.candidates(video_feats, captions).T


def similarity_matrix(
    model: Retriever,
    queries: list[str],
    video_feats: torch.Tensor,
    captions: list[str | None] | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """Cosine similarity [Q, C] of every query with every (video, caption) candidate."""
    return Scorer(model, batch_size).similarity(queries, video_feats, captions)


# ---- evaluation --------------------------------------------------------------------------------


def split_queries(
    dataset: Dataset, split: str, queries: Mapping[str, list[str]] | None = None, video_ids: Sequence[str] | None = None
) -> tuple[list[str], list[str], list[int]]:
    """(video ids, query texts, query -> video column) for a split, built-in or given queries."""
    vids = list(video_ids) if video_ids is not None else [v.id for v in dataset.split(split)]
    if not vids:
        raise DataError(f"{dataset.root}: split {split!r} has no videos")
    col = {v: i for i, v in enumerate(vids)}
    if queries is not None:
        unknown = sorted(set(queries) - set(col))
        if unknown:
            raise DataError(f"queries name videos not in split {split!r}: {unknown[:3]}")
    texts, q2v = [], []
    for v in vids:
        for q in queries.get(v, []) if queries is not None else dataset.queries_of(v):
            texts.append(q)
            q2v.append(col[v])
    if not texts:
        raise DataError(f"{dataset.root}: no queries for split {split!r}")
    return vids, texts, q2v


def reference_captions(
    dataset: Dataset, split: str = "test", seed: int = 0, queries: Mapping[str, list[str]] | None = None
) -> dict[str, str | None]:
    """Oracle auxiliary captions: per video one of its reference sentences that is NOT a query.

    The oracle is what a discriminative captioner would write, so it draws (seeded) among the
    video's *specific* sentences where the data set marks specificity, else among all of them.
    A video with no other sentence gets None (no caption) rather than leaking its query.
    """
    rng = random.Random(seed)
    specific = {(s.video_id, s.text) for s in dataset.sentences if s.specificity == "specific"}
    out: dict[str, str | None] = {}
    for v in dataset.split(split):
        banned = set(queries.get(v.id, []) if queries is not None else dataset.queries_of(v.id))
        pool = [s for s in dataset.sentences_of(v.id) if s not in banned]
        best = [s for s in pool if (v.id, s) in specific]
        out[v.id] = rng.choice(best or pool) if pool else None
    return out


def evaluate(
    model: Retriever,
    dataset: Dataset,
    features: GlobalFeatures,
    captions: Mapping[str, str | None] | None,
    split: str = "test",
    queries: Mapping[str, list[str]] | None = None,
    scorer: Scorer | None = None,
    search: SearchConfig = SearchConfig(),
) -> dict[str, Any]:
    """t2v / v2t metrics and twin-group accuracy on a split.

    captions: video id -> auxiliary caption (None / missing: no caption); ignored by a model
    without captions. queries: {video id: [sentence, ...]} replacing the built-in queries.
    Pass a `Scorer` to reuse its cached query vectors across calls with the same model.
    search: galleries above `search.exact_max` videos are ranked with FAISS (same ranks).
    """
    vids, texts, q2v = split_queries(dataset, split, queries)
    caps = [captions.get(v) for v in vids] if captions is not None else None
    own: dict[int, set[str]] = {}
    for t, c in zip(texts, q2v):
        own.setdefault(c, set()).add(t)
    # A caption identical to its own video's query: fine for a generated caption, a leak for an
    # oracle one; counted so a results table can show it.
    leaks = sum(1 for i, c in enumerate(caps or []) if c is not None and c in own.get(i, ()))
    scorer = scorer or Scorer(model)
    cands = torch.cat(
        [
            scorer.candidates(
                features.global_feats(vids[i : i + CANDIDATE_CHUNK]),
                caps[i : i + CANDIDATE_CHUNK] if caps is not None else None,
            )
            for i in range(0, len(vids), CANDIDATE_CHUNK)
        ]
    )
    groups = [dataset.by_id[v].group for v in vids]
    out: dict[str, Any] = embedding_metrics(scorer.queries(texts), cands, q2v, groups, search)
    out.update(
        split=split,
        n_videos=len(vids),
        n_queries=len(texts),
        captioned=sum(c is not None for c in caps or []),
        caption_equals_query=leaks,
        variant=model.config.variant,
    )
    return out


def read_queries(path: str | Path) -> dict[str, list[str]]:
    """--queries FILE.json: {video_id: [sentence, ...]} (a single string is one sentence)."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object {{video_id: [sentence, ...]}}")
    bad = next((k for k, v in data.items() if not isinstance(v, (str, list))), None)
    if bad is not None:
        raise DataError(f"{path}: video {bad!r}: expected a sentence or a list of sentences")
    out = {str(k): ([v] if isinstance(v, str) else list(v)) for k, v in data.items()}
    if any(not isinstance(s, str) or not s.strip() for v in out.values() for s in v):
        raise DataError(f"{path}: every query must be a non-empty string")
    return out
