"""DPO / DG-DPO losses: trl's own sigmoid loss as the reference, hand-worked group values."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

import caredpo
from caredpo.dpo.loss import dg_dpo_loss, dpo_loss, pair_mask


def _trl_sigmoid_loss(pc, pr, rc, rr, beta):
    """trl 1.16's DPO loss through its own code: DPOTrainer._compute_loss (the method the trainer
    calls) bound to a minimal stand-in trainer, with a model stand-in whose fused LM head returns
    one completion token per sequence carrying the summed log-prob. Reference log-probs go in as
    trl's precomputed columns."""
    from trl import DPOTrainer

    b = len(pc)
    logps = torch.cat([pc, pr])[:, None]  # [2B, 1]: batch is [chosen, rejected] in trl
    out = SimpleNamespace(
        log_probs=logps,
        entropy=torch.zeros_like(logps),
        mean_logits=torch.zeros_like(logps),
        is_top1=torch.zeros_like(logps, dtype=torch.bool),
    )
    model = SimpleNamespace(training=True)
    model_call = lambda **kw: out  # noqa: E731  (trl calls model(**kwargs, labels=..., fused_lm_head=True))
    ident = lambda x: x  # noqa: E731
    trainer = SimpleNamespace(
        model=model,
        accelerator=SimpleNamespace(device="cpu", gather=ident, gather_for_metrics=ident),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=["sigmoid"],
        loss_weights=[1.0],
        beta=beta,
        use_weighting=False,
        label_smoothing=0.0,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.ones(2 * b, 2, dtype=torch.long),
        "attention_mask": torch.ones(2 * b, 2, dtype=torch.long),
        "completion_mask": torch.tensor([[0, 1]] * (2 * b)),
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
    }
    loss = DPOTrainer._compute_loss(trainer, model_call, inputs, return_outputs=False)
    return loss, trainer._metrics["train"]


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_dpo_loss_matches_trl(beta):
    g = torch.Generator().manual_seed(int(beta * 10))
    pc, pr, rc, rr = (-30 * torch.rand(16, generator=g, dtype=torch.float64) for _ in range(4))
    ours = dpo_loss(pc, pr, rc, rr, beta)
    theirs, metrics = _trl_sigmoid_loss(pc, pr, rc, rr, beta)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    assert ours.item() > 0
    # our statistics use trl's definitions of reward accuracy and margin
    _, stats = dg_dpo_loss(
        torch.stack([pc, pr], 1), torch.stack([rc, rr], 1), torch.tensor([[1.0, 0.0]] * 16), None, None, beta, 0.0
    )
    assert stats.reward_acc == pytest.approx(metrics["rewards/accuracies"][0])
    assert stats.margin == pytest.approx(metrics["rewards/margins"][0])


def test_package_exports_losses():
    assert caredpo.dpo_loss is dpo_loss
    assert caredpo.dg_dpo_loss is dg_dpo_loss


def test_group_of_two_is_dpo():
    g = torch.Generator().manual_seed(0)
    pol, ref = -20 * torch.rand(8, 2, generator=g), -20 * torch.rand(8, 2, generator=g)
    rewards = torch.rand(8, 2, generator=g)  # the winner is column 0 in some rows, 1 in others
    w = rewards.argmax(1)
    rows = torch.arange(8)
    loss, stats = dg_dpo_loss(pol, ref, rewards, None, None, beta=0.3, lambda_video=0.0, margin=0.0)
    want = dpo_loss(pol[rows, w], pol[rows, 1 - w], ref[rows, w], ref[rows, 1 - w], 0.3)
    torch.testing.assert_close(loss, want)
    assert stats.n_pairs == 8 and stats.videos_without_pairs == 0
    # best_worst of a group of two is the same single pair
    loss_bw, _ = dg_dpo_loss(pol, ref, rewards, None, None, 0.3, 0.0, pairs="best_worst")
    torch.testing.assert_close(loss_bw, want)


def test_video_group_hand_worked():
    # one video, K=2 (h = [1, 0], caption 0 best), two twins with h(u, c*) = 1 and -1; beta = 1
    pol, ref = torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2)
    rewards = torch.tensor([[0.9, 0.1]])
    pcross, rcross = torch.tensor([[1.0, -1.0]]), torch.zeros(1, 2)
    loss, stats = dg_dpo_loss(pol, ref, rewards, pcross, rcross, beta=1.0, lambda_video=0.5)
    l_cap = math.log1p(math.exp(-1.0))  # -log sigmoid(1)     = 0.313262
    l_vid = (math.log(2.0) + math.log1p(math.exp(-2.0))) / 2  # (0.693147 + 0.126928) / 2 = 0.410038
    assert stats.loss_caption == pytest.approx(0.313262, abs=1e-6)
    assert stats.loss_video == pytest.approx(0.410038, abs=1e-6)
    assert loss.item() == pytest.approx(l_cap + 0.5 * l_vid, abs=1e-6)
    assert stats.video_acc == pytest.approx(0.5)  # 1 > 1 is false, 1 > -1 true
    assert stats.video_margin == pytest.approx(1.0)  # mean of (0, 2)


def test_video_group_mask_and_batch_mean():
    # video 0: twins h = [0, pad]; video 1: twins h = [2, 2]; h_best = 0 for both, beta = 0.5
    pol, ref = torch.zeros(2, 2), torch.zeros(2, 2)
    rewards = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    pcross = torch.tensor([[0.0, 123.0], [2.0, 2.0]])
    mask = torch.tensor([[True, False], [True, True]])
    _, stats = dg_dpo_loss(pol, ref, rewards, pcross, torch.zeros(2, 2), 0.5, 1.0, cross_mask=mask)
    # video 0: -log sigmoid(0) = log 2; video 1: -log sigmoid(-1) = log(1 + e)
    assert stats.loss_video == pytest.approx((math.log(2) + math.log1p(math.e)) / 2, abs=1e-6)


def test_caption_group_hand_worked_margin_and_best_worst():
    # K=3, rewards (3, 2, 2.05), margin 0.1: valid pairs (0,1) and (0,2) only; beta = 1
    pol, ref = torch.tensor([[2.0, 0.0, 1.0]]), torch.zeros(1, 3)
    rewards = torch.tensor([[3.0, 2.0, 2.05]])
    mask = pair_mask(rewards, 0.1)
    assert mask.sum() == 2 and mask[0, 0, 1] and mask[0, 0, 2]
    loss, stats = dg_dpo_loss(pol, ref, rewards, None, None, 1.0, 0.0, margin=0.1)
    want = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-1.0))) / 2
    assert loss.item() == pytest.approx(want, abs=1e-6)
    assert stats.reward_acc == 1.0 and stats.margin == pytest.approx(1.5)
    loss_bw, stats_bw = dg_dpo_loss(pol, ref, rewards, None, None, 1.0, 0.0, pairs="best_worst")
    assert stats_bw.n_pairs == 1  # best = 0, worst = 1
    assert loss_bw.item() == pytest.approx(math.log1p(math.exp(-2.0)), abs=1e-6)


def test_no_valid_pair_contributes_zero_and_keeps_graph():
    pol = torch.tensor([[1.0, 2.0], [0.5, 0.0]], requires_grad=True)
    rewards = torch.tensor([[1.0, 1.0], [2.0, 0.0]])  # video 0: tie, no pair
    loss, stats = dg_dpo_loss(pol, torch.zeros(2, 2), rewards, None, None, 1.0, 0.0)
    assert stats.videos_without_pairs == 1 and stats.n_pairs == 1
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.5)), abs=1e-6)  # video 1 alone
    loss.backward()
    assert pol.grad[0].abs().sum() == 0 and pol.grad[1].abs().sum() > 0
    pol.grad = None
    loss0, stats0 = dg_dpo_loss(pol, torch.zeros(2, 2), torch.ones(2, 2), None, None, 1.0, 0.0)
    assert loss0.item() == 0.0 and stats0.videos_without_pairs == 2
    loss0.backward()  # no error: the zero keeps the graph
    assert math.isnan(stats0.reward_acc)


def test_gradient_reaches_policy_not_reference():
    g = torch.Generator().manual_seed(1)
    pol = (-10 * torch.rand(2, 3, generator=g)).requires_grad_()
    pcross = (-10 * torch.rand(2, 2, generator=g)).requires_grad_()
    ref, rcross = -10 * torch.rand(2, 3, generator=g), -10 * torch.rand(2, 2, generator=g)
    loss, _ = dg_dpo_loss(pol, ref, torch.rand(2, 3, generator=g), pcross, rcross, 0.1, 1.0)
    loss.backward()
    assert pol.grad.abs().sum() > 0 and pcross.grad.abs().sum() > 0
    # the twin term pushes h(u, c*) down: its gradient is positive on the loss
    assert (pcross.grad > 0).all()
    assert ref.grad is None and rcross.grad is None


def test_nll_term_and_ragged_captions():
    pol, ref = torch.tensor([[-4.0, -6.0, 0.0]]), torch.tensor([[-4.0, -6.0, 0.0]])
    rewards = torch.tensor([[1.0, 0.0, 99.0]])  # column 2 is padding: never best, never a pair
    cmask = torch.tensor([[True, True, False]])
    lengths = torch.tensor([[2, 3, 1]])
    loss, stats = dg_dpo_loss(
        pol, ref, rewards, None, None, 1.0, 0.0, caption_mask=cmask, lambda_nll=0.5, lengths=lengths
    )
    assert stats.n_pairs == 1
    assert stats.loss_nll == pytest.approx(2.0)  # 4 nats over 2 tokens
    assert loss.item() == pytest.approx(math.log(2) + 0.5 * 2.0, abs=1e-6)
    with pytest.raises(ValueError, match="lengths"):
        dg_dpo_loss(pol, ref, rewards, None, None, 1.0, 0.0, lambda_nll=0.5)
    with pytest.raises(ValueError, match="pairs"):
        pair_mask(rewards, pairs="every")


def test_stats_of_two_halves_combine_to_the_whole_batch():
    """DPOStats' declared rules (count-weighted means, summed counts) rebuild the whole batch's stats
    from two shares, as `batch.shared_loss` does across processes."""
    from caredpo.dpo.stats import from_sums, weighted_sums

    g = torch.Generator().manual_seed(3)
    pol, ref, rew = (torch.randn(6, 3, generator=g, dtype=torch.float64) for _ in range(3))
    rew[1] = 0.5  # a video without a valid pair
    cross, ref_cross = (torch.randn(6, 2, generator=g, dtype=torch.float64) for _ in range(2))
    xmask = torch.ones(6, 2, dtype=torch.bool)
    xmask[4] = False  # a video without twins
    lengths = torch.full((6, 3), 4.0, dtype=torch.float64)

    def stats(rows):
        return dg_dpo_loss(
            pol[rows],
            ref[rows],
            rew[rows],
            cross[rows],
            ref_cross[rows],
            0.5,
            1.0,
            cross_mask=xmask[rows],
            lambda_nll=0.1,
            lengths=lengths[rows],
        )[1]

    whole = stats(slice(0, 6))
    parts = [weighted_sums(stats(slice(0, 2))), weighted_sums(stats(slice(2, 6)))]
    combined = from_sums([a + b for a, b in zip(*parts)])
    for name, value in whole.to_row().items():
        if name != "loss":  # the loss of shares is weighted by `shared_loss`, not summed raw
            assert combined.to_row()[name] == pytest.approx(value, rel=1e-6), name  # accuracies: fp32 means
    assert combined.n_pairs == whole.n_pairs and combined.twins == 10 and combined.video_videos == 5
