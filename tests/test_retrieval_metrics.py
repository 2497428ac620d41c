"""Retrieval metrics against a naive loop reference: ties, several sentences per video, v2t, twins."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from caredpo.retrieval.metrics import retrieval_metrics, t2v_ranks, twin_accuracy, v2t_ranks


def naive_t2v(sim, q2v):
    ranks = []
    for i, v in enumerate(q2v):
        others = [j for j in range(sim.shape[1]) if j != v]
        ranks.append(1 + sum(sim[i, j] >= sim[i, v] for j in others))
    return ranks


def naive_v2t(sim, q2v):
    """Per video: best over its sentences of 1 + #(sentences of other videos scoring >= it)."""
    ranks = []
    for v in range(sim.shape[1]):
        own = [i for i in range(sim.shape[0]) if q2v[i] == v]
        if not own:
            continue
        other = [k for k in range(sim.shape[0]) if q2v[k] != v]
        ranks.append(min(1 + sum(sim[k, v] >= sim[i, v] for k in other) for i in own))
    return ranks


def naive_summary(ranks):
    r = np.array(ranks, dtype=float)
    out = {f"R{k}": 100.0 * float(np.mean(r <= k)) for k in (1, 5, 10)}
    out.update(MdR=float(np.median(r)), MnR=float(np.mean(r)))
    return out


def naive_twin(sim, q2v, groups):
    hits, n = 0, 0
    for i, v in enumerate(q2v):
        twins = [u for u in range(sim.shape[1]) if u != v and groups[v] is not None and groups[u] == groups[v]]
        if not twins:
            continue
        n += 1
        hits += all(sim[i, v] > sim[i, u] for u in twins)
    return 100.0 * hits / n if n else float("nan")


def random_case(seed, n_videos=23, levels=4):
    """Integer scores in few levels (many ties), 0-3 sentences per video (some videos have none)."""
    rng = np.random.default_rng(seed)
    per_video = rng.integers(0, 4, n_videos)
    q2v = np.repeat(np.arange(n_videos), per_video)
    rng.shuffle(q2v)
    sim = rng.integers(0, levels, (len(q2v), n_videos)).astype(np.float32)
    return sim, q2v


@pytest.mark.parametrize("seed", range(12))
def test_ranks_match_naive_reference_with_ties_and_several_sentences(seed):
    sim, q2v = random_case(seed)
    assert t2v_ranks(sim, q2v).tolist() == naive_t2v(sim, q2v)
    assert v2t_ranks(sim, q2v).tolist() == naive_v2t(sim, q2v)
    got = retrieval_metrics(torch.from_numpy(sim), torch.from_numpy(q2v))
    for direction, ref in (("t2v", naive_t2v(sim, q2v)), ("v2t", naive_v2t(sim, q2v))):
        assert got[direction] == pytest.approx(naive_summary(ref))


@pytest.mark.parametrize("seed", range(8))
def test_twin_accuracy_matches_naive_reference(seed):
    sim, q2v = random_case(seed, n_videos=20, levels=3)
    rng = np.random.default_rng(100 + seed)
    groups = [f"g{v // 4}" if rng.random() > 0.1 else None for v in range(20)]
    got, ref = twin_accuracy(sim, q2v, groups), naive_twin(sim, q2v, groups)
    assert (math.isnan(got) and math.isnan(ref)) or got == pytest.approx(ref)


def test_all_ties_rank_last_not_first():
    sim = np.zeros((5, 5))
    m = retrieval_metrics(sim, np.arange(5))
    assert m["t2v"]["R1"] == 0.0 and m["t2v"]["MdR"] == 5.0
    assert m["v2t"]["MnR"] == 5.0
    assert twin_accuracy(sim, np.arange(5), ["a"] * 5) == 0.0


def test_perfect_diagonal_and_known_values():
    sim = torch.eye(4) + 0.01 * torch.arange(4.0)  # off-diagonal ordered, diagonal on top
    m = retrieval_metrics(sim, [0, 1, 2, 3])
    assert m["t2v"] == {"R1": 100.0, "R5": 100.0, "R10": 100.0, "MdR": 1.0, "MnR": 1.0}
    # query 0 points at video 3: video 3 scores 0.03, beaten by video 0 (1.0) only -> rank 2
    m = retrieval_metrics(sim, [3, 1, 2, 3])
    assert t2v_ranks(sim, [3, 1, 2, 3]).tolist() == [2, 1, 1, 1]
    assert m["t2v"]["R1"] == 75.0
    # v2t: video 0 has no sentence (left out); video 3's best sentence is query 3 (1.03)
    assert v2t_ranks(sim, [3, 1, 2, 3]).tolist() == [1, 1, 1]


def test_v2t_own_sentences_do_not_compete():
    # video 0 has two equal-scoring sentences: it is still first (they are both right answers)
    sim = np.array([[0.9, 0.1], [0.9, 0.2], [0.3, 0.8]])
    assert v2t_ranks(sim, [0, 0, 1]).tolist() == [1, 1]


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="2-D"):
        retrieval_metrics(np.zeros(3), [0, 1, 2])
    with pytest.raises(ValueError, match="entries"):
        retrieval_metrics(np.zeros((3, 3)), [0, 1])
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(np.zeros((2, 3)), [0, 3])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(np.full((2, 2), np.nan), [0, 1])
