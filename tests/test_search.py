"""Search at scale: FAISS (flat and HNSW) and exact torch search give the same ranks, neighbours,
evaluation metrics and hard negatives (ties pessimistic on both paths)."""

from __future__ import annotations

import pytest
import torch


def _embeddings(n_gallery=300, n_query=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    gallery = torch.nn.functional.normalize(torch.randn(n_gallery, 16, generator=g), dim=-1)
    gallery[1::7] = gallery[0::7][: len(gallery[1::7])]  # exact duplicates: pessimistic ties
    truth = torch.randint(0, n_gallery, (n_query,), generator=g)
    queries = torch.nn.functional.normalize(gallery[truth] + 0.6 * torch.randn(n_query, 16, generator=g), dim=-1)
    return queries, gallery, truth


@pytest.mark.parametrize("depth", [5, 100, 1000])
def test_faiss_and_exact_search_give_the_same_ranks(depth):
    from caredpo.retrieval.search import SearchConfig, embedding_metrics, t2v_ranks, v2t_ranks

    q, g, truth = _embeddings()
    exact, forced = SearchConfig(), SearchConfig(exact_max=0, rank_depth=depth, chunk=64)
    ranks = t2v_ranks(q, g, truth, exact)
    assert torch.equal(t2v_ranks(q, g, truth, forced), ranks)
    assert torch.equal(v2t_ranks(q, g, truth, forced), v2t_ranks(q, g, truth, exact))
    assert ranks.max() > 5 and (ranks[truth % 7 < 2] > 1).all()  # deep ranks; a duplicate is a tie, never won
    groups = [f"g{j // 4}" if j % 5 else None for j in range(len(g))]
    assert embedding_metrics(q, g, truth.tolist(), groups, forced) == embedding_metrics(
        q, g, truth.tolist(), groups, exact
    )


def test_faiss_and_exact_neighbours_agree():
    from caredpo.retrieval.search import SearchConfig, neighbours, topk

    _, g, _ = _embeddings(seed=1)
    g = g[torch.arange(len(g)) % 7 != 1]  # no duplicates: a unique order
    assert torch.equal(neighbours(g, 3, SearchConfig(exact_max=0)), neighbours(g, 3))
    s1, i1 = topk(g[:10], g, 5, SearchConfig(exact_max=0))
    s2, i2 = topk(g[:10], g, 5)
    assert torch.equal(i1, i2) and torch.allclose(s1, s2, atol=1e-6)
    hnsw = neighbours(g, 3, SearchConfig(exact_max=0, index="hnsw"))
    assert (hnsw == neighbours(g, 3)).float().mean() > 0.9


def test_evaluate_and_hard_negatives_use_faiss_above_the_threshold():
    from caredpo.dpo.prefs import hard_negatives
    from caredpo.retrieval.model import Retriever
    from caredpo.retrieval.score import evaluate, reference_captions
    from caredpo.retrieval.search import SearchConfig
    from test_dpo_prefs import dataset
    from test_retriever import synthetic, tiny_cfg

    ds, feats = synthetic()
    torch.manual_seed(0)
    model = Retriever(tiny_cfg()).eval()
    caps = reference_captions(ds, "test")
    assert evaluate(model, ds, feats, caps, search=SearchConfig(exact_max=0, rank_depth=2)) == evaluate(
        model, ds, feats, caps
    )
    pds = dataset(groups=3, grouped=False)
    ids = [v.id for v in pds.videos]
    emb = torch.randn(len(ids), 8, generator=torch.Generator().manual_seed(0))
    embed = lambda vs: emb[[ids.index(v) for v in vs]]  # noqa: E731
    assert hard_negatives(pds, ids, embed, 3, SearchConfig(exact_max=0)) == hard_negatives(pds, ids, embed, 3)
