"""Two-stage retrieval as pure tensor functions: the first stage ranks the whole gallery, the
reranker re-orders each query's top k, the rest keep their first-stage order.

The result is a similarity matrix again, so the metrics (retrieval.metrics, pessimistic ties) read
it unchanged: each row's top-k columns are lifted above every other column, in the reranker's
order, and two top-k candidates the reranker scores equal stay tied. The same functions serve v2t
on the transposed matrix (a video's top k sentences).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch
from torch import Tensor

from ..retrieval.metrics import summarize_ranks, t2v_ranks, twin_accuracy, v2t_ranks


def top_k(similarity: Tensor, k: int) -> Tensor:
    """[Q, min(k, V)] columns of each row's k highest scores, best first; equal scores in column
    order (a stable sort, so the first stage's ties are broken the same way every run)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return similarity.argsort(dim=1, descending=True, stable=True)[:, :k]


def merge(similarity: Tensor, columns: Tensor, scores: Tensor) -> Tensor:
    """[Q, V] float64: row q's `columns[q]` take `scores[q]` (shifted above every first-stage
    score of the matrix), every other column keeps its first-stage score."""
    sim = similarity.detach().to(torch.float64).cpu()
    columns, scores = columns.cpu(), scores.detach().to(torch.float64).cpu()
    if columns.shape != scores.shape or columns.shape[0] != sim.shape[0]:
        raise ValueError(f"columns {tuple(columns.shape)} and scores {tuple(scores.shape)} must be [Q, k]")
    if torch.isnan(scores).any():
        raise ValueError("reranker scores contain NaN")
    lift = sim.max() - scores.min() + 1.0  # the lowest reranked score still beats every other one
    return sim.scatter(1, columns, scores + lift)


PairScorer = Callable[[Tensor, Tensor], Tensor]  # (query index [N], video index [N]) -> scores [N]


def two_stage_metrics(
    similarity: Tensor,
    query_to_video: Sequence[int],
    groups: Sequence[Hashable | None],
    score: PairScorer,
    k: int = 16,
) -> dict:
    """{"t2v", "v2t", "twin_acc", "pairs_scored"} of the reranked rankings.

    t2v reranks each query's top-k videos, v2t each video's top-k sentences; a (query, video) pair
    in both is scored once. Twin accuracy is read from the t2v ranking."""
    sim = similarity.detach().to(torch.float64).cpu()
    t_cols, v_cols = top_k(sim, k), top_k(sim.T, k)  # [Q, k] videos, [V, k'] queries
    q_t = torch.arange(sim.shape[0])[:, None].expand_as(t_cols)
    v_v = torch.arange(sim.shape[1])[:, None].expand_as(v_cols)
    pairs = torch.cat(
        [torch.stack([q_t.flatten(), t_cols.flatten()], 1), torch.stack([v_cols.flatten(), v_v.flatten()], 1)]
    )
    unique, inverse = pairs.unique(dim=0, return_inverse=True)
    scored = score(unique[:, 0], unique[:, 1]).detach().to(torch.float64).cpu()[inverse]
    t2v = merge(sim, t_cols, scored[: t_cols.numel()].reshape(t_cols.shape))
    v2t = merge(sim.T, v_cols, scored[t_cols.numel() :].reshape(v_cols.shape)).T
    return {
        "t2v": summarize_ranks(t2v_ranks(t2v, query_to_video)),
        "v2t": summarize_ranks(v2t_ranks(v2t, query_to_video)),
        "twin_acc": twin_accuracy(t2v, query_to_video, groups),
        "pairs_scored": len(unique),
    }
