"""Nearest neighbours and pessimistic ranks over embedding galleries of any size.

Up to `EXACT_MAX_GALLERY` gallery items: one torch matmul, the whole [Q, V] score matrix (what
evaluation always did). Above it: FAISS `IndexFlatIP` (exact inner products, searched in query
chunks, so memory stays [chunk, k] rather than [Q, V]). An HNSW graph is opt-in for galleries too
large to scan (`SearchConfig(index="hnsw")`): approximate, so it serves `topk` / `neighbours` only;
ranks always use the exact index.

Both exact paths give the same neighbours and the same pessimistic ranks (rank = 1 + number of
other candidates scoring >= the ground truth, see `metrics`) on the same data. Only candidates
within float32 rounding (~1e-7) of each other may order differently: torch and FAISS sum dot
products in different orders. Vectors are expected L2-normalised (inner product = cosine).

    scores, idx = topk(queries, gallery, k=10)          # [Q, k] each, best first
    nbrs = neighbours(embeddings, k=3)                  # [N, 3], self excluded
    m = embedding_metrics(q, c, q2v, groups)            # {"t2v", "v2t", "twin_acc"} as in evaluate
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .metrics import group_codes, retrieval_metrics, summarize_ranks, twin_accuracy
from .metrics import t2v_ranks as matrix_t2v_ranks
from .metrics import v2t_ranks as matrix_v2t_ranks

EXACT_MAX_GALLERY = 50_000  # galleries up to this size: torch computes the full score matrix
SCORE_BUDGET = 2**27  # torch top-k: at most this many scores (512 MB float32) at a time
INDEXES = ("flat", "hnsw")


@dataclass(frozen=True)
class SearchConfig:
    exact_max: int = EXACT_MAX_GALLERY  # gallery size up to which torch scores everything; above: FAISS
    index: str = "flat"  # FAISS index above exact_max: "flat" (IndexFlatIP, exact) or "hnsw" (approximate)
    hnsw_m: int = 32  # HNSW: links per node
    ef_search: int = 64  # HNSW: candidates kept while searching (recall against time)
    rank_depth: int = 100  # FAISS ranks: top-k per query; a ground truth below it is counted exactly
    chunk: int = 4096  # queries per FAISS call; gallery rows (and queries) per step of exact counts

    def __post_init__(self) -> None:
        if self.index not in INDEXES:
            raise ValueError(f"SearchConfig.index must be one of {INDEXES}, got {self.index!r}")
        if min(self.hnsw_m, self.ef_search, self.rank_depth, self.chunk) < 1 or self.exact_max < 0:
            raise ValueError("SearchConfig: exact_max >= 0 and hnsw_m, ef_search, rank_depth, chunk >= 1")


# ---- FAISS ---------------------------------------------------------------------------------------


def _np(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())


def build_index(gallery: torch.Tensor, config: SearchConfig = SearchConfig(), exact: bool = False):
    """A FAISS inner-product index over gallery [V, H]: IndexFlatIP, or HNSW if configured (and not exact)."""
    import faiss

    faiss.omp_set_num_threads(torch.get_num_threads())  # the same threads as torch (shared machines)
    x = _np(gallery)
    if config.index == "hnsw" and not exact:
        index = faiss.IndexHNSWFlat(x.shape[1], config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = max(config.ef_search, 1)
    else:
        index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    return index


def search_index(index, queries: torch.Tensor, k: int, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores float32 [Q, k], indices long [Q, k]) from a FAISS index, in query chunks."""
    q = _np(queries)
    found = [index.search(q[i : i + chunk], k) for i in range(0, len(q), chunk)] or [
        (np.zeros((0, k), np.float32), np.zeros((0, k), np.int64))
    ]
    return (
        torch.from_numpy(np.concatenate([d for d, _ in found])),
        torch.from_numpy(np.concatenate([i for _, i in found])).long(),
    )


# ---- neighbours ----------------------------------------------------------------------------------


def topk(
    queries: torch.Tensor, gallery: torch.Tensor, k: int, config: SearchConfig = SearchConfig()
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best gallery items per query by inner product, best first: (scores [Q, k], indices [Q, k])."""
    k = min(k, len(gallery))
    if len(gallery) <= config.exact_max:
        return _torch_topk(queries.float(), gallery.float(), k)
    return search_index(build_index(gallery, config), queries, k, config.chunk)


def _torch_topk(
    queries: torch.Tensor, gallery: torch.Tensor, k: int, skip_self: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by matmul in query chunks of at most SCORE_BUDGET scores; skip_self: queries
    are the gallery and each row's own column is excluded."""
    rows = max(1, SCORE_BUDGET // max(len(gallery), 1))
    out = []
    for q0 in range(0, len(queries), rows):
        sim = queries[q0 : q0 + rows] @ gallery.T
        if skip_self:
            sim[torch.arange(len(sim)), torch.arange(q0, q0 + len(sim))] = -float("inf")
        out.append(sim.topk(k, dim=1))
    if not out:
        return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.long)
    return torch.cat([s for s, _ in out]), torch.cat([i for _, i in out])


def neighbours(embeddings: torch.Tensor, k: int, config: SearchConfig = SearchConfig()) -> torch.Tensor:
    """[N, k] indices of each item's k nearest *other* items of the same set, nearest first."""
    k = min(k, len(embeddings) - 1)
    if len(embeddings) <= config.exact_max:
        return _torch_topk(embeddings, embeddings, k, skip_self=True)[1]
    _, idx = search_index(build_index(embeddings, config), embeddings, k + 1, config.chunk)
    other = idx != torch.arange(len(idx))[:, None]  # self sits anywhere among exact ties, or is missing
    order = torch.argsort((~other).to(torch.uint8), dim=1, stable=True)  # others first, in rank order
    return idx.gather(1, order)[:, :k]


# ---- pessimistic ranks ---------------------------------------------------------------------------


def t2v_ranks(
    queries: torch.Tensor, gallery: torch.Tensor, truth: torch.Tensor, config: SearchConfig = SearchConfig()
) -> torch.Tensor:
    """[Q] 1-based pessimistic rank of gallery item truth[i] for query i (== metrics.t2v_ranks of
    the full score matrix). FAISS: exact top-`rank_depth`; a truth found strictly above the last
    score is ranked from it, any other query by an exact chunked count."""
    if len(gallery) <= config.exact_max:
        return matrix_t2v_ranks(queries @ gallery.T, truth)
    k = min(config.rank_depth, len(gallery))
    scores, idx = search_index(build_index(gallery, config, exact=True), queries, k, config.chunk)
    hit = idx == truth[:, None]
    s = scores.masked_fill(~hit, -float("inf")).amax(dim=1)  # truth's score, in FAISS's arithmetic
    # everything >= the truth is inside the top-k if the truth beats the k-th score (or k is all)
    resolved = hit.any(dim=1) & ((scores[:, -1] < s) | (k == len(gallery)))
    ranks = (scores >= s[:, None]).sum(dim=1)
    rest = (~resolved).nonzero()[:, 0]
    if len(rest):
        ranks[rest] = counted_ranks(queries[rest], gallery, truth[rest], config.chunk)
    return ranks


def counted_ranks(queries: torch.Tensor, gallery: torch.Tensor, truth: torch.Tensor, chunk: int) -> torch.Tensor:
    """Exact pessimistic ranks without the [Q, V] matrix, in gallery chunks. The truth's score is
    read from a product of the very shape its competitors' come from (BLAS may sum differently for
    other shapes), so exact ties stay ties: two passes over the chunks that hold truths."""
    out = torch.empty(len(queries), dtype=torch.long)
    for q0 in range(0, len(queries), chunk):
        q, t = queries[q0 : q0 + chunk], truth[q0 : q0 + chunk]
        s = torch.empty(len(q))
        for g0 in range(0, len(gallery), chunk):
            sel = ((t >= g0) & (t < g0 + chunk)).nonzero()[:, 0]
            if len(sel):
                s[sel] = (q @ gallery[g0 : g0 + chunk].T)[sel, t[sel] - g0]
        counts = torch.zeros(len(q), dtype=torch.long)
        for g0 in range(0, len(gallery), chunk):
            counts += (q @ gallery[g0 : g0 + chunk].T >= s[:, None]).sum(dim=1)
        out[q0 : q0 + chunk] = counts
    return out


def v2t_ranks(
    queries: torch.Tensor, gallery: torch.Tensor, truth: torch.Tensor, config: SearchConfig = SearchConfig()
) -> torch.Tensor:
    """[V'] v2t ranks (== metrics.v2t_ranks): the sentences are the candidates, so above exact_max
    the [Q, V] matrix is scored in gallery-column chunks (exact; memory [Q, chunk])."""
    if len(gallery) <= config.exact_max:
        return matrix_v2t_ranks(queries @ gallery.T, truth)
    out = []
    for g0 in range(0, len(gallery), config.chunk):
        sim = (queries @ gallery[g0 : g0 + config.chunk].T).double()  # [Q, c]
        own = truth[:, None] == torch.arange(g0, g0 + sim.shape[1])[None, :]
        best = sim.masked_fill(~own, float("-inf")).amax(dim=0)
        beaten = (sim >= best[None, :]) & ~own
        out.append((1 + beaten.sum(dim=0))[own.any(dim=0)])
    return torch.cat(out)


def twin_accuracy_sparse(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    truth: torch.Tensor,
    groups: Sequence[Hashable | None],
    chunk: int = 4096,
) -> float:
    """metrics.twin_accuracy without the [Q, V] matrix: each query scores only its video's group."""
    codes = group_codes(groups)
    members: dict[int, list[int]] = {}
    for j, c in enumerate(codes.tolist()):
        if c >= 0:
            members.setdefault(c, []).append(j)
    width = max(map(len, members.values()), default=1)
    table = torch.full((len(members) + 1, width), -1, dtype=torch.long)  # last row: "no group"
    for c, cols in members.items():
        table[c, : len(cols)] = torch.tensor(cols)
    wins, n = 0, 0
    for q0 in range(0, len(queries), chunk):
        t = truth[q0 : q0 + chunk]
        cols = table[codes[t]]  # [q, W]; code -1 picks the last row
        twin = (cols >= 0) & (cols != t[:, None])
        s = torch.einsum("qh,qwh->qw", queries[q0 : q0 + chunk], gallery[cols.clamp(min=0)]).double()
        own = s.masked_fill(cols != t[:, None], float("-inf")).amax(dim=1)
        lost = ((s >= own[:, None]) & twin).any(dim=1)
        has = twin.any(dim=1)
        wins, n = wins + int((~lost & has).sum()), n + int(has.sum())
    return wins / n * 100 if n else float("nan")


def embedding_metrics(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    query_to_video: Sequence[int],
    groups: Sequence[Hashable | None],
    config: SearchConfig = SearchConfig(),
) -> dict:
    """{"t2v", "v2t", "twin_acc"} from unit vectors: queries [Q, H], candidates [V, H]."""
    if len(candidates) <= config.exact_max:
        sim = queries @ candidates.T
        return {**retrieval_metrics(sim, query_to_video), "twin_acc": twin_accuracy(sim, query_to_video, groups)}
    truth = torch.as_tensor(query_to_video, dtype=torch.long)
    if len(truth) != len(queries) or (len(truth) and (truth.min() < 0 or truth.max() >= len(candidates))):
        raise ValueError("query_to_video needs one column index in [0, n_videos) per query")
    if len(groups) != len(candidates):
        raise ValueError(f"groups has {len(groups)} entries for {len(candidates)} videos")
    return {
        "t2v": summarize_ranks(t2v_ranks(queries, candidates, truth, config)),
        "v2t": summarize_ranks(v2t_ranks(queries, candidates, truth, config)),
        "twin_acc": twin_accuracy_sparse(queries, candidates, truth, groups, config.chunk),
    }
