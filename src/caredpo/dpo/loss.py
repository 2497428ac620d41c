"""DPO and Dual-Group DPO (DG-DPO) losses: pure tensor functions, no models, no I/O.

DG-DPO as written here is OUR RECONSTRUCTION (the paper's formula is not public; see
docs/design.md, "DG-DPO: our reconstruction"). With `h(v, c) = log pi_theta(c|v) - log pi_ref(c|v)`:

- caption group (one video v, its K captions): for every pair (w, l) with
  `r_w - r_l > margin`, `-log sigmoid(beta * (h(v, c_w) - h(v, c_l)))`; averaged over the valid
  pairs of a video, then over the videos that have at least one valid pair. A video without a
  valid pair (all rewards within `margin`) contributes nothing; `stats["videos_without_pairs"]`
  counts them, and a batch with no valid pair at all gives a caption loss of exactly 0.
  `pairs="best_worst"` keeps only the (argmax, argmin) pair: the plain DPO baseline.
- video group (the best caption c* of v, its own video vs the M twins u in N(v)):
  `-log sigmoid(beta * (h(v, c*) - h(u, c*)))`, averaged over the twins, then over videos.
- `L = L_caption + lambda_video * L_video + lambda_nll * NLL(c* | v)`, the NLL per token.

With K = 2, lambda_video = 0 and margin = 0, `dg_dpo_loss` equals `dpo_loss` (the sigmoid loss
of Rafailov et al., as in trl's `loss_type="sigmoid"`).

`dg_dpo_terms` gives the unweighted terms (each a mean over videos) and their statistics
(`stats.DPOStats`); `weighted_sum` adds them up with their lambdas (and, under data parallelism,
this process's share of each term's videos).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from .stats import DPOStats

PAIR_MODES = ("all", "best_worst")
TERMS = ("caption", "video", "nll")  # the loss terms, in the order L adds them


def dpo_loss(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float
) -> Tensor:
    """Sigmoid DPO loss, mean over the batch. All inputs: summed sequence log-probs [B]."""
    logits = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * logits).mean()


def pair_mask(rewards: Tensor, margin: float = 0.0, pairs: str = "all", caption_mask: Tensor | None = None) -> Tensor:
    """Which (winner w, loser l) pairs enter the caption group: bool [G, K, K], [g, w, l]."""
    if pairs not in PAIR_MODES:
        raise ValueError(f"pairs must be one of {PAIR_MODES}, got {pairs!r}")
    valid = torch.ones_like(rewards, dtype=torch.bool) if caption_mask is None else caption_mask.bool()
    both = valid[:, :, None] & valid[:, None, :]
    mask = (rewards[:, :, None] - rewards[:, None, :] > margin) & both
    if pairs == "best_worst":
        best, worst = _masked_argmax(rewards, valid), _masked_argmax(-rewards, valid)
        only = torch.zeros_like(mask)
        only[torch.arange(len(rewards)), best, worst] = True
        mask = mask & only
    return mask


def _masked_argmax(x: Tensor, valid: Tensor) -> Tensor:
    """argmax over the last dim ignoring invalid entries (first index wins ties) -> [G]."""
    return x.masked_fill(~valid, float("-inf")).argmax(dim=-1)


def caption_group_loss(h: Tensor, mask: Tensor, beta: float) -> tuple[Tensor, dict]:
    """h: [G, K] policy-minus-reference log-ratios; mask: [G, K, K] from `pair_mask`."""
    diff = h[:, :, None] - h[:, None, :]  # [G, K, K]: h_w - h_l
    per_pair = -F.logsigmoid(beta * diff)
    n = mask.sum(dim=(1, 2))  # valid pairs per video [G]
    has = n > 0
    per_video = (per_pair * mask).sum(dim=(1, 2)) / n.clamp(min=1)
    # `h.sum() * 0` keeps the graph (and a zero gradient) when no video has a valid pair
    loss = per_video[has].mean() if has.any() else h.sum() * 0.0
    d = diff.detach()[mask]
    stats = {
        "loss_caption": float(loss.detach()),
        "caption_videos": int(has.sum()),
        "n_pairs": int(n.sum()),
        "videos_without_pairs": int((~has).sum()),
        "reward_acc": float((d > 0).float().mean()) if d.numel() else float("nan"),
        "margin": float(beta * d.mean()) if d.numel() else float("nan"),
    }
    return loss, stats


def video_group_loss(
    h_best: Tensor, h_cross: Tensor, beta: float, cross_mask: Tensor | None = None
) -> tuple[Tensor, dict]:
    """h_best: [G] h(v, c*); h_cross: [G, M] h(u, c*) for the twins u of v; mask [G, M]."""
    valid = torch.ones_like(h_cross, dtype=torch.bool) if cross_mask is None else cross_mask.bool()
    diff = h_best[:, None] - h_cross  # [G, M]
    per = -F.logsigmoid(beta * diff)
    n = valid.sum(dim=1)
    has = n > 0
    per_video = (per * valid).sum(dim=1) / n.clamp(min=1)
    loss = per_video[has].mean() if has.any() else (h_best.sum() + h_cross.sum()) * 0.0
    d = diff.detach()[valid]
    stats = {
        "loss_video": float(loss.detach()),
        "video_videos": int(has.sum()),
        "twins": int(valid.sum()),
        "video_acc": float((d > 0).float().mean()) if d.numel() else float("nan"),
        "video_margin": float(beta * d.mean()) if d.numel() else float("nan"),
    }
    return loss, stats


def nll_loss(policy_best: Tensor, lengths: Tensor) -> Tensor:
    """Per-token NLL of the best caption: mean over videos of -log p(c*|v) / tokens(c*)."""
    return (-policy_best / lengths.clamp(min=1).to(policy_best.dtype)).mean()


def dg_dpo_terms(
    policy_logps: Tensor,
    ref_logps: Tensor,
    rewards: Tensor,
    policy_cross_logps: Tensor | None,
    ref_cross_logps: Tensor | None,
    beta: float,
    margin: float = 0.0,
    *,
    pairs: str = "all",
    caption_mask: Tensor | None = None,
    cross_mask: Tensor | None = None,
    best: Tensor | None = None,
    lengths: Tensor | None = None,
) -> tuple[dict[str, Tensor], DPOStats]:
    """The unweighted terms {"caption", "video" (with cross log-probs), "nll" (with lengths)} and
    their stats (`loss` left 0: see `weighted_sum`). Shapes as in `dg_dpo_loss`."""
    h = policy_logps - ref_logps
    valid = torch.ones_like(rewards, dtype=torch.bool) if caption_mask is None else caption_mask.bool()
    best = _masked_argmax(rewards, valid) if best is None else best
    rows = torch.arange(len(h))
    terms: dict[str, Tensor] = {}
    terms["caption"], stats = caption_group_loss(h, pair_mask(rewards, margin, pairs, valid), beta)
    if policy_cross_logps is not None and policy_cross_logps.numel() > 0:
        h_cross = policy_cross_logps - ref_cross_logps
        terms["video"], vstats = video_group_loss(h[rows, best], h_cross, beta, cross_mask)
        stats.update(vstats)
    if lengths is not None:
        terms["nll"] = nll_loss(policy_logps[rows, best], lengths[rows, best])
        stats.update(loss_nll=float(terms["nll"].detach()), nll_videos=len(h))
    return terms, DPOStats(**stats)


def weighted_sum(
    terms: Mapping[str, Tensor], lambdas: Mapping[str, float], shares: Mapping[str, float] | None = None
) -> Tensor:
    """L = sum of lambda_t * term_t over the terms present with lambda_t != 0, in TERMS order.
    shares: each term's factor under data parallelism (this process's videos in the term / all
    processes' videos in it), so the processes' losses add up to the whole batch's loss."""
    total = None
    for name in TERMS:
        if name not in terms or not lambdas[name]:
            continue
        part = lambdas[name] * (terms[name] if shares is None else terms[name] * shares[name])
        total = part if total is None else total + part
    return total


def dg_dpo_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    rewards: Tensor,
    policy_cross_logps: Tensor | None,
    ref_cross_logps: Tensor | None,
    beta: float,
    lambda_video: float,
    margin: float = 0.0,
    *,
    pairs: str = "all",
    caption_mask: Tensor | None = None,
    cross_mask: Tensor | None = None,
    best: Tensor | None = None,
    lambda_nll: float = 0.0,
    lengths: Tensor | None = None,
) -> tuple[Tensor, DPOStats]:
    """DG-DPO (our reconstruction). Shapes: policy_logps, ref_logps, rewards [G, K]; cross [G, M]
    = log-probs of each video's best caption under its M twins (None: no video group).

    Keyword options: `pairs` ("all" | "best_worst"), `caption_mask` [G, K] (padding of ragged K),
    `cross_mask` [G, M] (padding of ragged M), `best` [G] (default: argmax reward, first on ties),
    `lambda_nll` with `lengths` [G, K] caption token counts (NLL of the best caption per token).
    Video-group stats are computed whenever cross log-probs are given, even at lambda_video = 0
    (plain DPO shows how twins drift). Returns (loss, stats); stats hold detached numbers only.
    """
    if lambda_nll and lengths is None:
        raise ValueError("lambda_nll > 0 needs `lengths` (caption token counts [G, K])")
    terms, stats = dg_dpo_terms(
        policy_logps,
        ref_logps,
        rewards,
        policy_cross_logps,
        ref_cross_logps,
        beta,
        margin,
        pairs=pairs,
        caption_mask=caption_mask,
        cross_mask=cross_mask,
        best=best,
        lengths=lengths if lambda_nll else None,
    )
    loss = weighted_sum(terms, {"caption": 1.0, "video": lambda_video, "nll": lambda_nll})
    return loss, stats.with_loss(float(loss.detach()))
