"""Reranker: listwise loss and two-stage merge against naive references, prefix reuse against one
unpadded pass per pair, zero-initialised roles, training on the tiny LM, save/load."""

from __future__ import annotations

import math
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from caredpo.captioner.model import CaptionerConfig, VideoCaptioner
from caredpo.records import Dataset, Sentence, Video
from caredpo.rerank.loss import listwise_loss
from caredpo.rerank.model import SCORES, Reranker, RerankerConfig
from caredpo.rerank.train import RerankerTrainConfig, list_scores, step_units, train_reranker, unit_list
from caredpo.rerank.two_stage import merge, top_k, two_stage_metrics
from caredpo.retrieval.metrics import t2v_ranks

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = CaptionerConfig(lm="tiny", projector_hidden=32, lora_layers=-1, lora_rank=4, num_frames=4)
CAPS = ["a red circle moves left", None, "a blue square slides down over the sand and turns yellow"]
QUERIES = ["red circle", "a square moves", "blue", "the star turns green halfway"]


def feats(b: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 4, 4, 1280, generator=torch.Generator().manual_seed(seed)).abs()


def reranker(variant: str = "caption_role", score: str = "yes_no") -> Reranker:
    torch.manual_seed(0)
    return Reranker(RerankerConfig(variant=variant, score=score), VideoCaptioner(TINY)).eval()


# ---- listwise loss -----------------------------------------------------------------------------


def test_listwise_loss_matches_a_loop_and_a_hand_worked_value():
    scores = torch.tensor([[2.0, 0.0, 1.0], [0.5, 1.5, -3.0]])
    positive, mask = torch.tensor([0, 1]), torch.tensor([[True, True, True], [True, True, False]])
    naive = 0.0
    for row, p, m in zip(scores, positive, mask):
        kept = [float(s) for s, ok in zip(row, m) if ok]
        naive += -(float(row[p]) - math.log(sum(math.exp(s / 2.0) for s in kept)) * 2.0) / 2.0
    assert listwise_loss(scores, positive, mask, temperature=2.0).item() == pytest.approx(naive / 2, rel=1e-6)
    # one query, scores (0, 0): -log(1/2)
    assert listwise_loss(torch.zeros(1, 2), torch.tensor([1])).item() == pytest.approx(math.log(2))


def test_listwise_loss_refuses_a_masked_positive():
    with pytest.raises(ValueError, match="masked"):
        listwise_loss(torch.zeros(1, 2), torch.tensor([1]), torch.tensor([[True, False]]))


# ---- two-stage merge ---------------------------------------------------------------------------


def test_reranking_only_permutes_within_top_k_and_keeps_the_rest_in_first_stage_order():
    sim = torch.tensor([[0.9, 0.1, 0.5, 0.7, 0.3, 0.2]])
    cols = top_k(sim, 3)
    assert cols.tolist() == [[0, 3, 2]]
    final = merge(sim, cols, torch.tensor([[0.0, 5.0, 2.0]]))
    order = final.argsort(1, descending=True)[0].tolist()
    assert order[:3] == [3, 2, 0]  # the reranker's order inside the top 3
    assert order[3:] == [4, 5, 1]  # the first stage's order outside it
    assert set(order[:3]) == set(cols[0].tolist())


def test_top_k_breaks_first_stage_ties_by_column_and_reranked_ties_stay_pessimistic():
    sim = torch.tensor([[0.5, 0.5, 0.5, 0.1]])
    assert top_k(sim, 2).tolist() == [[0, 1]]
    cols = top_k(sim, 3)
    final = merge(sim, cols, torch.zeros(1, 3))  # the reranker ties all three
    assert t2v_ranks(final, [1]).tolist() == [3]  # a tie counts against the truth


def test_two_stage_metrics_with_an_oracle_reranker_fixes_ranks_inside_k_only():
    # 4 queries, 4 videos; query 3's video is outside the first stage's top 2
    sim = torch.tensor([[0.1, 0.9, 0.0, 0.0], [0.2, 0.9, 0.0, 0.0], [0.0, 0.0, 0.5, 0.9], [0.9, 0.8, 0.1, 0.0]])
    q2v = [0, 1, 2, 3]

    def oracle(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (q == v).double()

    out = two_stage_metrics(sim, q2v, [None] * 4, oracle, k=2)
    assert out["t2v"]["R1"] == 75.0  # queries 0-2 now rank their video first; query 3 stays at 4
    assert out["t2v"]["MnR"] == pytest.approx((1 + 1 + 1 + 4) / 4)
    assert out["pairs_scored"] <= 16


# ---- the model ---------------------------------------------------------------------------------


@pytest.mark.parametrize("score", sorted(SCORES))
def test_prefix_reuse_equals_one_unpadded_pass_per_pair(score):
    m = reranker(score=score)
    with torch.no_grad():
        m.roles.weight.normal_()  # roles on, so each span's role is checked too
        f, cand = feats(3), torch.tensor([0, 2, 1, 2])
        got = m.score_pairs(f, CAPS, QUERIES, cand)
        want = []
        for q, c in zip(QUERIES, cand.tolist()):
            prefix, _ = m.prefixes(f[c : c + 1], [CAPS[c]])
            ids, _, is_query = m.query_ids([q])
            tail = m.captioner.embed(ids) + is_query[..., None] * m.roles.weight[2]
            h = m.captioner.decoder(inputs_embeds=torch.cat([prefix, tail], 1)).last_hidden_state[:, -1]
            want.append(SCORES[score](m, h)[0])
    torch.testing.assert_close(got, torch.stack(want), atol=1e-5, rtol=1e-5)


def test_zero_initialised_roles_score_like_the_model_without_roles():
    f, cand = feats(3), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        with_roles = reranker("caption_role").score_pairs(f, CAPS, QUERIES, cand)
        without = reranker("caption").score_pairs(f, CAPS, QUERIES, cand)
        no_caption = reranker("no_caption").score_pairs(f, CAPS, QUERIES, cand)
    torch.testing.assert_close(with_roles, without)
    assert not torch.allclose(with_roles, no_caption)  # the caption is read


def test_save_and_load_give_the_same_scores(tmp_path):
    m = reranker(score="linear")
    with torch.no_grad():
        m.roles.weight.normal_()
        before = m.score(feats(3), CAPS, QUERIES[:3])
    m.save_pretrained(tmp_path / "rr")
    back = Reranker.from_pretrained(tmp_path / "rr").eval()
    with torch.no_grad():
        torch.testing.assert_close(back.score(feats(3), CAPS, QUERIES[:3]), before)


# ---- training ----------------------------------------------------------------------------------


def twin_data(groups: int = 3) -> tuple[Dataset, dict]:
    """Twin groups of 4 clips; each clip's specific sentences name its group and index."""
    videos, sentences, store = [], [], {}
    for g in range(groups):
        for i in range(4):
            vid = f"g{g}v{i}"
            videos.append(Video(vid, f"/x/{vid}.mp4", "train", group=f"g{g}"))
            for s in range(2):
                sentences.append(Sentence(vid, f"clip {i} of group {g} take {s}", "specific"))
            store[vid] = feats(1, seed=10 * g + i)[0]
    return Dataset(Path("/x"), videos, sentences), store


class Store:
    def __init__(self, by_id):
        self.by_id = by_id

    def grid_feats(self, ids):
        return torch.stack([self.by_id[v] for v in ids])


def test_step_lists_hold_the_unit_and_never_caption_a_positive_with_its_query():
    ds, _ = twin_data()
    cfg = RerankerTrainConfig(units_per_step=2, candidates=6)
    units = ds.units([v.id for v in ds.videos])

    for step in range(3):
        chosen = step_units(units, cfg, step)
        assert len(chosen) == 2
        for u in chosen:
            ul = unit_list(ds, u, [v.id for v in ds.videos], None, None, cfg, random.Random(step))
            assert ul.candidates[:4] == u and len(set(ul.candidates)) == 6
            for q, p in zip(ul.queries, ul.positives):
                assert ul.captions[p] != q and q in ds.specific_sentences_of(ul.candidates[p])


def test_training_lowers_the_loss_moves_lora_and_roles_and_leaves_the_base(tmp_path):
    ds, by_id = twin_data()
    torch.manual_seed(0)
    captioner = VideoCaptioner(TINY)
    base = {n: p.detach().clone() for n, p in captioner.named_parameters() if "lora_" not in n}
    lora = {n: p.detach().clone() for n, p in captioner.named_parameters() if "lora_" in n}
    cfg = RerankerTrainConfig(steps=30, units_per_step=3, candidates=4, lr=3e-3, head_lr=3e-2, warmup_steps=0)
    model, metrics = train_reranker(cfg, captioner, ds, Store(by_id).grid_feats, tmp_path / "rr", progress=False)
    losses = [r["loss"] for r in model_log(tmp_path / "rr")]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    assert all(torch.equal(p, base[n]) for n, p in model.captioner.named_parameters() if n in base)
    assert any(not torch.equal(p, lora[n]) for n, p in model.captioner.named_parameters() if n in lora)
    assert model.roles.weight.abs().sum() > 0
    assert (tmp_path / "rr" / "model" / "config.json").exists() and metrics["step"] == 30


def test_training_resumes_to_the_same_weights(tmp_path):
    ds, by_id = twin_data(2)
    cfg = RerankerTrainConfig(steps=6, units_per_step=1, candidates=4, lr=3e-3, save_every=3, warmup_steps=0)

    def run(out, steps, resume=False):
        torch.manual_seed(0)

        return train_reranker(
            replace(cfg, steps=steps),
            VideoCaptioner(TINY),
            ds,
            Store(by_id).grid_feats,
            out,
            resume=resume,
            progress=False,
        )[0]

    whole = run(tmp_path / "a", 6)
    run(tmp_path / "b", 3)
    resumed = run(tmp_path / "b", 6, resume=True)
    for (n, p), q in zip(whole.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, msg=n)


def test_list_scores_shapes():
    ds, by_id = twin_data(2)
    m = reranker()
    cfg = RerankerTrainConfig(candidates=5)

    lists = [
        unit_list(ds, u, [v.id for v in ds.videos], None, None, cfg, random.Random(0))
        for u in ds.units([v.id for v in ds.videos])
    ]
    scores, mask, pos = list_scores(m, lists, Store(by_id).grid_feats)
    assert scores.shape == (8, 5) and mask.all() and pos.tolist() == [0, 1, 2, 3] * 2


def model_log(folder):
    from caredpo.training import MetricsLog

    return MetricsLog(folder).rows()


def test_reranker_reward_scores_every_query_against_every_candidate():
    from caredpo.rerank.evaluate import RerankerReward

    ds, by_id = twin_data(1)
    m = reranker()
    ids, caps = ["g0v0", "g0v0", "g0v1"], ["a red circle", "a blue square", None]
    got = RerankerReward(m, Store(by_id).grid_feats, first_stage=None).logits(QUERIES[:2], ids, caps)
    with torch.no_grad():
        want = torch.stack([m.score(Store(by_id).grid_feats(ids), caps, [q] * 3) for q in QUERIES[:2]])
    assert got.shape == (2, 3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
