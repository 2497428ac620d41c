"""Retrieval metrics as pure tensor functions (no model imports).

Conventions (docs/design.md, "Evaluation conventions"):
- `similarity` is [n_queries, n_videos]; `query_to_video[i]` is the column of query i's video.
- Ties are pessimistic: rank = 1 + number of *other* candidates scoring >= the ground truth, so a
  retriever that gives twins identical scores is not rewarded (the argsort / `np.where` code copied
  across CLIP4Clip descendants ranks a tie by index order and so rewards it half the time).
- Several sentences per video: every sentence is a query (t2v); in v2t a video's candidates are all
  sentences and its rank is the rank of its best sentence, i.e. 1 + the number of sentences of
  *other* videos scoring >= its best sentence (its own other sentences are correct answers too, not
  competitors). Videos without any sentence have no v2t rank and are left out of v2t.
- R@k are percentages (0-100); MdR / MnR are 1-based.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import torch

RECALL_AT = (1, 5, 10)


def _as_tensor(similarity: Any) -> torch.Tensor:
    """[Q, V] float64 tensor from a tensor or array; rejects NaN (it would rank arbitrarily)."""
    sim = torch.as_tensor(np.asarray(similarity) if not torch.is_tensor(similarity) else similarity)
    sim = sim.detach().to("cpu", torch.float64)
    if sim.ndim != 2:
        raise ValueError(f"similarity must be 2-D [n_queries, n_videos], got shape {tuple(sim.shape)}")
    if torch.isnan(sim).any():
        raise ValueError("similarity contains NaN")
    return sim


def _as_index(query_to_video: Any, sim: torch.Tensor) -> torch.Tensor:
    idx = torch.as_tensor(np.asarray(query_to_video), dtype=torch.long).reshape(-1)
    if idx.numel() != sim.shape[0]:
        raise ValueError(f"query_to_video has {idx.numel()} entries for {sim.shape[0]} queries")
    if idx.numel() and (idx.min() < 0 or idx.max() >= sim.shape[1]):
        raise ValueError(f"query_to_video holds an index outside [0, {sim.shape[1]})")
    return idx


def summarize_ranks(ranks: torch.Tensor) -> dict[str, float]:
    """R1/R5/R10 in percent, median and mean rank, from 1-based ranks [N]."""
    r = ranks.to(torch.float64)
    if r.numel() == 0:
        return {**{f"R{k}": float("nan") for k in RECALL_AT}, "MdR": float("nan"), "MnR": float("nan")}
    out = {f"R{k}": float((r <= k).double().mean() * 100) for k in RECALL_AT}
    # torch.median returns the lower middle element; the usual MdR (np.median) averages the two.
    out["MdR"] = float(np.median(r.numpy()))
    out["MnR"] = float(r.mean())
    return out


def t2v_ranks(similarity: Any, query_to_video: Any) -> torch.Tensor:
    """1-based pessimistic rank of each query's video among all videos: [Q] long."""
    sim = _as_tensor(similarity)
    idx = _as_index(query_to_video, sim)
    truth = sim.gather(1, idx[:, None])  # [Q, 1]
    # >= counts the ground truth itself once, which is the "1 +" of the definition.
    return (sim >= truth).sum(dim=1)


def v2t_ranks(similarity: Any, query_to_video: Any) -> torch.Tensor:
    """1-based pessimistic rank of each video (with >= 1 sentence) among all sentences: [V'] long."""
    sim = _as_tensor(similarity)
    idx = _as_index(query_to_video, sim)
    own = torch.zeros_like(sim, dtype=torch.bool)  # own[i, v]: sentence i belongs to video v
    own[torch.arange(sim.shape[0]), idx] = True
    has_text = own.any(dim=0)  # [V]
    best = sim.masked_fill(~own, float("-inf")).amax(dim=0)  # [V] best own sentence
    beaten = (sim >= best[None, :]) & ~own  # other videos' sentences at or above it
    ranks = 1 + beaten.sum(dim=0)
    return ranks[has_text]


def retrieval_metrics(similarity: Any, query_to_video: Any) -> dict[str, dict[str, float]]:
    """{"t2v": {R1, R5, R10, MdR, MnR}, "v2t": {...}} from a [Q, V] similarity (tensor or array)."""
    return {
        "t2v": summarize_ranks(t2v_ranks(similarity, query_to_video)),
        "v2t": summarize_ranks(v2t_ranks(similarity, query_to_video)),
    }


def twin_accuracy(similarity: Any, query_to_video: Any, groups: Sequence[Hashable | None]) -> float:
    """Percent of queries whose video scores strictly above each of its twins.

    `groups[v]` is the twin group of video column v (None: no group). Only the twins present as
    columns compete; a query whose video has no twin among the columns is left out. A tie with a
    twin counts as wrong (pessimistic, as for ranks). Returns NaN when no query has twins.
    """
    sim = _as_tensor(similarity)
    idx = _as_index(query_to_video, sim)
    if len(groups) != sim.shape[1]:
        raise ValueError(f"groups has {len(groups)} entries for {sim.shape[1]} videos")
    codes = group_codes(groups)  # [V], -1 = no group
    gq = codes[idx]  # [Q] group of each query's video
    twin = (codes[None, :] == gq[:, None]) & (gq[:, None] >= 0)  # [Q, V]
    twin[torch.arange(sim.shape[0]), idx] = False
    has_twin = twin.any(dim=1)
    if not has_twin.any():
        return float("nan")
    truth = sim.gather(1, idx[:, None])
    lost = ((sim >= truth) & twin).any(dim=1)
    return float((~lost[has_twin]).double().mean() * 100)


def group_codes(groups: Sequence[Hashable | None]) -> torch.Tensor:
    """[V] int code of each video's twin group (`Video.group`), -1 for a lone video."""
    table: dict[Hashable, int] = {}
    codes = [-1 if g is None else table.setdefault(g, len(table)) for g in groups]
    return torch.tensor(codes, dtype=torch.long)
