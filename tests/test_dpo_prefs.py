"""The preference stage: reward maths by hand, rows the trainer accepts, resume without duplicates."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from caredpo.dpo.prefs import (
    GROUPS_FILE,
    PrefsConfig,
    RetrieverReward,
    _contrastive,
    _rewards,
    build_preferences,
    factor_diagnostics,
    hard_negatives,
    summarize,
)
from caredpo.dpo.train import load_groups
from caredpo.records import DataError, Dataset, Sentence, Video

WORDS = ["left", "right", "up", "down", "red", "blue", "circle", "square"]


class WordScorer:
    """S(q, c) = number of query words in the caption (the video part is ignored)."""

    model = SimpleNamespace(logit_scale=lambda: torch.tensor(2.0))

    def similarity(self, queries, feats, captions):
        return torch.tensor([[float(len(set(q.split()) & set(c.split()))) for c in captions] for q in queries])

    def candidates(self, feats):
        return feats.flatten(1)


class ListCaptioner:
    """Samples phrases from WORDS with the given seed; log p = -(words + 1) - mean feature."""

    def generate(self, features, n=1, temperature=1.0, top_p=1.0, max_new_tokens=8, seed=None):
        g = torch.Generator().manual_seed(seed)
        pick = lambda: " ".join(WORDS[i] for i in torch.randint(len(WORDS), (3,), generator=g).tolist())
        return [[pick() for _ in range(n)] for _ in range(features.shape[0])]

    def logprob(self, features, captions):
        return torch.tensor([-(len(c.split()) + 1.0) for c in captions]) - features.flatten(1).mean(1)

    def encode_captions(self, captions):
        mask = torch.tensor([[1] * (len(c.split()) + 1) + [0] * (9 - len(c.split())) for c in captions]).bool()
        return None, mask


class Store:
    def __init__(self, ids):
        torch.manual_seed(0)
        self.table = {v: torch.randn(2, 4, 3) for v in ids}
        self.ids = list(ids)

    def grid_feats(self, ids):
        return torch.stack([self.table[v] for v in ids])

    def global_feats(self, ids):
        return self.grid_feats(ids).mean(2)


def dataset(groups=3, grouped=True) -> Dataset:
    videos, sents = [], []
    for g in range(groups):
        for i, word in enumerate(["left", "right", "up", "down"]):
            vid = f"v{g}{i}"
            videos.append(Video(vid, f"{vid}.mp4", "train", f"g{g}" if grouped else None))
            sents += [Sentence(vid, f"a red circle moves {word}"), Sentence(vid, "a red circle")]
    return Dataset("/nowhere", videos, sents)


def test_contrastive_reward_by_hand():
    # 2 queries, K = 2 captions of v, then M = 1 twin.
    sim = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    expected = [
        (2 - math.log(math.exp(2) + math.exp(1)) + 1 - math.log(math.exp(1) + math.exp(0))) / 2,
        (0 - math.log(math.exp(0) + math.exp(1)) + 1 - math.log(math.exp(1) + math.exp(0))) / 2,
    ]
    assert torch.allclose(_contrastive(sim, 2), torch.tensor(expected))


@pytest.fixture
def built(tmp_path):
    ds = dataset()
    store = Store([v.id for v in ds.videos])
    greedy = {v.id: "a red circle" for v in ds.videos}
    path = build_preferences(
        ListCaptioner(),
        RetrieverReward(WordScorer(), store),
        ds,
        store,
        tmp_path / "p",
        greedy,
        PrefsConfig(num_samples=4),
    )
    return ds, store, greedy, path


def test_rows_are_what_the_trainer_needs(built):
    ds, store, _, path = built
    rows = load_groups(path)  # validates every field
    assert [r["video_id"] for r in rows] == [v.id for v in ds.videos]
    cap = ListCaptioner()
    for r in rows:
        assert r["negatives"] == ds.twins_of(r["video_id"]) and len(r["ref_cross_logps"]) == 3
        assert r["rewards"][r["best"]] == max(r["rewards"])
        feats = store.grid_feats([r["video_id"]] * 4)
        assert r["ref_logps"] == pytest.approx(cap.logprob(feats, r["captions"]).tolist())
        assert r["lengths"] == [len(c.split()) + 1 for c in r["captions"]]
    best = rows[0]["captions"][rows[0]["best"]]
    # The best caption shares at least as many words with v's sentences as any other sample.
    overlap = lambda c: sum(len(set(s.split()) & set(c.split())) for s in ds.sentences_of(rows[0]["video_id"]))
    assert overlap(best) == max(overlap(c) for c in rows[0]["captions"])


def test_twin_groups_batched_in_one_generate_call_get_the_same_rows(tmp_path, one_thread):
    """units_per_call only changes the decode batch: a real (tiny, fp32) captioner writes the same
    samples, rewards and log-probs with 1 and 3 twin groups per generate call."""
    from caredpo.captioner.model import CaptionerConfig, VideoCaptioner

    cap = VideoCaptioner(CaptionerConfig(lm="tiny", projector_hidden=32, lora_layers=-1, lora_rank=4)).eval()
    ds = dataset(groups=3)
    store = Store([v.id for v in ds.videos])
    g = torch.Generator().manual_seed(0)
    store.table = {v: torch.rand(8, 4, 1280, generator=g) for v in store.ids}  # the captioner's grid
    greedy = {v.id: "a red circle" for v in ds.videos}
    reward = RetrieverReward(WordScorer(), store)
    files = [
        build_preferences(
            cap,
            reward,
            ds,
            store,
            tmp_path / f"u{n}",
            greedy,
            PrefsConfig(num_samples=3, max_new_tokens=6, units_per_call=n),
            show_progress=False,
        ).read_text()
        for n in (1, 3)
    ]
    assert files[0] == files[1] and len(files[0].splitlines()) == 12
    # killed after the first group of a 3-group call: the rerun samples the whole call again
    path = tmp_path / "u3" / GROUPS_FILE
    path.write_text("".join(files[1].splitlines(keepends=True)[:4]))
    again = PrefsConfig(num_samples=3, max_new_tokens=6, units_per_call=3)
    build_preferences(cap, reward, ds, store, tmp_path / "u3", greedy, again, show_progress=False)
    assert path.read_text() == files[1]
    assert len({c for r in load_groups(tmp_path / "u1" / GROUPS_FILE) for c in r["captions"]}) > 3


def test_resume_after_a_partial_file_repeats_and_loses_nothing(built, tmp_path):
    ds, store, greedy, path = built
    full = path.read_text()
    lines = full.splitlines(keepends=True)
    part = tmp_path / "q" / GROUPS_FILE
    part.parent.mkdir()
    part.write_text("".join(lines[:5]) + lines[5][:10])  # a killed writer: 5 rows and a torn line
    build_preferences(
        ListCaptioner(),
        RetrieverReward(WordScorer(), store),
        ds,
        store,
        part.parent,
        greedy,
        PrefsConfig(num_samples=4),
    )
    assert part.read_text() == full


def test_missing_greedy_caption_of_a_twin_is_a_clear_error(tmp_path):
    ds = dataset(groups=1)
    store = Store([v.id for v in ds.videos])
    with pytest.raises(DataError, match="no greedy caption"):
        build_preferences(
            ListCaptioner(), RetrieverReward(WordScorer(), store), ds, store, tmp_path, {"v00": "x"}, PrefsConfig()
        )


def test_without_groups_neighbours_come_from_the_embedding():
    ds = dataset(groups=2, grouped=False)
    ids = [v.id for v in ds.videos]
    emb = torch.eye(len(ids))
    emb[1] = emb[0] + 0.1 * emb[1]  # v01 is v00's nearest neighbour
    negs = hard_negatives(ds, ids, lambda vs: emb[[ids.index(v) for v in vs]], k=2)
    assert negs["v00"][0] == "v01" and len(negs["v00"]) == 2 and "v00" not in negs["v00"]


class BigramScorer(WordScorer):
    """S(q, c) = shared word bigrams: order-sensitive, like a retriever trained on specific pairs."""

    def similarity(self, queries, feats, captions):
        grams = lambda t: set(zip(t.split(), t.split()[1:]))
        return torch.tensor([[float(len(grams(q) & grams(c))) for c in captions] for q in queries])


def direction_dataset() -> Dataset:
    videos, sents = [], []
    for i, (a, b) in enumerate([("left", "right"), ("right", "left")]):
        vid = f"v{i}"
        videos.append(Video(vid, f"{vid}.mp4", "train", "g0", factors={"motion": f"{a}-to-{b}"}))
        sents += [
            Sentence(vid, "a red circle on grass", "generic"),
            Sentence(vid, f"a red circle moves from {a} to {b}", "specific"),
        ]
    return Dataset("/nowhere", videos, sents)


def test_reward_ranks_the_right_direction_above_the_twins():
    ds = direction_dataset()
    store = Store(["v0", "v1"])
    greedy = {"v0": "a red circle moves from left to right", "v1": "a red circle moves from right to left"}
    caps = ["a red circle moves from left to right", "a red circle moves from right to left", "a red circle"]
    for queries in ("specific", "all"):
        r = _rewards(
            RetrieverReward(BigramScorer(), store), ds, "v0", caps, ["v1"], greedy, PrefsConfig(reward_queries=queries)
        )
        assert r[0] > r[1] and r[0] > r[2]  # the right direction beats the twin's and beats saying nothing
    # only discriminative queries: the generic sentence, which every twin matches, is not a query
    sim = BigramScorer().similarity
    seen = []
    BigramScorer.similarity = lambda self, q, f, c: seen.append(q) or sim(q, f, c)
    try:
        _rewards(RetrieverReward(BigramScorer(), store), ds, "v0", caps, ["v1"], greedy, PrefsConfig())
    finally:
        BigramScorer.similarity = sim.__func__
    assert seen == [["a red circle moves from left to right"]]


def test_factor_diagnostics_by_hand():
    ds = direction_dataset()
    right, wrong = "it moves from left to right", "it moves from right to left"
    rows = [
        {"video_id": "v0", "captions": [right, wrong, "a circle"], "rewards": [1.0, 0.0, 1.0], "best": 0},
        {"video_id": "v0", "captions": [wrong, right, wrong], "rewards": [2.0, 1.0, 1.0], "best": 0},
        {"video_id": "v0", "captions": [wrong, wrong, wrong], "rewards": [0.0, 1.0, 2.0], "best": 2},
    ]
    d = factor_diagnostics(rows, ds, "direction")
    assert d["direction_any_right"] == pytest.approx(2 / 3)
    assert d["direction_best_right"] == pytest.approx(1 / 2)
    # pairs (right, wrong): row 1: (0,1) win, (0,2) "a circle" is wrong too: tie -> 0.5; row 2: (1,0) loss, (1,2) tie
    assert d["direction_pair_acc"] == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
    assert factor_diagnostics(rows, ds, "events") == {}  # the clips have no events


def test_summary_reports_every_factor_the_clips_have():
    # a reward that prefers the wrong size shows as size pair accuracy 0, next to the right direction
    ds = Dataset(
        "/nowhere",
        [Video("v0", "v0.mp4", "train", "g0", factors={"size": "large", "motion": "left-to-right"})],
        [Sentence("v0", "a big circle moves from left to right", "specific")],
    )
    rows = [
        {
            "video_id": "v0",
            "captions": ["a small circle moves from left to right", "a big circle moves from right to left"],
            "rewards": [1.0, 0.0],
            "best": 0,
        }
    ]
    s = summarize(rows, ds)
    assert s["size_pair_acc"] == 0.0 and s["size_best_right"] == 0.0
    assert s["direction_pair_acc"] == 1.0 and s["direction_best_right"] == 1.0
    assert not any(k.startswith(("colour_", "events_")) for k in s)  # factors the clip lacks
