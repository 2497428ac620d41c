"""Two-stage evaluation: the bi-encoder ranks the split's gallery, the reranker re-orders its top k.

Both stages read the same auxiliary captions (one caption arm). Pairs are scored grouped by video,
`videos_per_call` videos a `score_pairs` call, so each video's [visual][caption] prefix runs once
for all the queries it is scored against.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..captioner.base import visual_source
from ..retrieval.model import Retriever
from ..retrieval.score import similarity_matrix, split_queries
from .model import Reranker
from .two_stage import PairScorer, two_stage_metrics


def pair_scorer(
    model: Reranker,
    visual,
    video_ids: Sequence[str],
    captions: Sequence[str | None],
    queries: Sequence[str],
    videos_per_call: int = 16,
) -> PairScorer:
    """(query index [N], video index [N]) -> reranker scores [N], without gradients. visual: video
    ids -> the reranker's visual input."""

    @torch.no_grad()
    def score(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        model.eval()
        out = torch.empty(len(q), dtype=torch.float64)
        videos = v.unique()  # sorted
        for i in range(0, len(videos), videos_per_call):
            chunk = videos[i : i + videos_per_call]
            rows = torch.isin(v, chunk).nonzero()[:, 0]
            local = torch.searchsorted(chunk, v[rows])
            ids = [video_ids[j] for j in chunk.tolist()]
            out[rows] = (
                model.score_pairs(
                    visual(ids),
                    [captions[j] for j in chunk.tolist()],
                    [queries[j] for j in q[rows].tolist()],
                    local,
                )
                .double()
                .cpu()
            )
        return out

    return score


def evaluate_reranked(
    reranker: Reranker,
    retriever: Retriever,
    dataset,
    store,
    captions: Mapping[str, str | None] | None,
    split: str = "test",
    queries: Mapping[str, list[str]] | None = None,
    k: int = 16,
) -> dict:
    """{"t2v", "v2t", "twin_acc", "pairs_scored", "k"} of the two-stage ranking on a split.
    captions: video id -> auxiliary caption (None / missing: none); queries as `retrieval.score.evaluate`."""
    vids, texts, q2v = split_queries(dataset, split, queries)
    caps = [(captions or {}).get(v) for v in vids]
    first = similarity_matrix(
        retriever, texts, store.global_feats(vids), caps if retriever.config.use_caption else None
    )
    groups = [dataset.by_id[v].group for v in vids]
    scorer = pair_scorer(reranker, visual_source(reranker.captioner, dataset, store), vids, caps, texts)
    out = two_stage_metrics(first, q2v, groups, scorer, k)
    out.update(k=k, split=split, n_videos=len(vids), n_queries=len(texts), variant=reranker.config.variant)
    return out


class RerankerReward:
    """The reranker as the preference stage's reward model (`dpo.prefs`): S(q, u, c) = its score
    of query q against video u carrying caption c. Video embeddings (the hard negatives of data
    without twin groups) come from a first-stage reward model (`dpo.prefs.RetrieverReward`)."""

    def __init__(self, reranker: Reranker, visual, first_stage):
        """visual: video ids -> the reranker's visual input (`captioner.base.visual_source`)."""
        self.reranker, self.visual, self.first_stage = reranker.eval(), visual, first_stage

    @torch.no_grad()
    def logits(self, queries: list[str], video_ids: list[str], captions: list[str | None]) -> torch.Tensor:
        """[Q, C]: every query against every (video, caption) candidate; each prefix runs once."""
        C = len(video_ids)
        flat = self.reranker.score_pairs(
            self.visual(video_ids),
            captions,
            [q for q in queries for _ in range(C)],
            torch.arange(C).repeat(len(queries)),
        )
        return flat.reshape(len(queries), C).cpu()

    def embed(self, video_ids: list[str]) -> torch.Tensor:
        return self.first_stage.embed(video_ids)
