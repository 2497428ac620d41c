"""One DG-DPO batch: preference rows -> the policy's log-probs of only the pairs used -> loss.

`batch_loss` is the whole batch in one process. Under `torchrun` (`caredpo.dist`) `shared_loss`
gives each process the contiguous share of the batch's twin groups, weights its loss terms by its
share of the videos each term averages over, and combines the stats, so the summed gradients and
the logged numbers equal one process's on the whole batch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import Tensor, nn

from .. import dist
from ..records import DataError, work_units
from .loss import dg_dpo_loss, pair_mask

if TYPE_CHECKING:
    from .train import DPOConfig

FeatureFn = Callable[[Sequence[str]], Tensor]


# ---------------------------------------------------------------- one batch

def _pad(rows: Sequence[dict], key: str, width: int, fill: float = 0.0) -> tuple[Tensor, Tensor]:
    """[G, width] float64 values and bool mask from ragged per-row lists."""
    vals = torch.full((len(rows), width), fill, dtype=torch.float64)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for g, row in enumerate(rows):
        n = len(row.get(key, []))
        vals[g, :n] = torch.tensor(row[key], dtype=torch.float64) if n else vals[g, :0]
        mask[g, :n] = True
    return vals, mask


def batch_loss(policy: nn.Module, rows: Sequence[dict], features: FeatureFn,
               config: DPOConfig, term_weights: tuple[float, float, float] | None = None) -> tuple[Tensor, dict]:
    """Policy log-probs of only the (video, caption) pairs the loss uses, in one `logprob` call,
    then `dg_dpo_loss` (term_weights: see there). Padded entries of ragged K / M are masked out."""
    if config.lambda_nll and any("lengths" not in r for r in rows):
        raise DataError("lambda_nll > 0 needs 'lengths' (caption token counts) in every preference row")
    k = max(len(r["captions"]) for r in rows)
    use_cross = config.lambda_video > 0
    m = max(len(r.get("negatives", [])) for r in rows) if use_cross else 0
    rewards, cmask = _pad(rows, "rewards", k)
    ref, _ = _pad(rows, "ref_logps", k)
    best = torch.tensor([r["best"] for r in rows])
    needed = _needed_captions(rewards, cmask, best, config)
    own = [(g, j, r["video_id"], r["captions"][j]) for g, r in enumerate(rows)
           for j in range(len(r["captions"])) if needed[g, j]]
    cross = [(g, j, u, r["captions"][r["best"]]) for g, r in enumerate(rows) if use_cross
             for j, u in enumerate(r.get("negatives", []))]
    logps = _policy_logps(policy, features, own + cross)
    dtype = logps.dtype
    pol = _scatter(logps[:len(own)], own, (len(rows), k))
    ref_cross, xmask = _pad(rows, "ref_cross_logps", m) if use_cross else (None, None)
    lengths = _pad(rows, "lengths", k, 1.0)[0] if config.lambda_nll else None
    return dg_dpo_loss(
        pol, ref.to(dtype), rewards.to(dtype),
        _scatter(logps[len(own):], cross, (len(rows), m)) if use_cross else None,
        ref_cross.to(dtype) if use_cross else None, config.beta, config.lambda_video, config.margin,
        pairs=config.pairs, caption_mask=cmask, cross_mask=xmask, best=best,
        lambda_nll=config.lambda_nll, lengths=lengths, term_weights=term_weights)


def _scatter(values: Tensor, items: list[tuple], shape: tuple[int, int]) -> Tensor:
    """[N] log-probs of items (g, j, ...) -> [G, W] (zeros elsewhere; masked in the loss)."""
    if not items:
        return torch.zeros(shape, dtype=values.dtype)
    g = torch.tensor([it[0] for it in items])
    j = torch.tensor([it[1] for it in items])
    return torch.zeros(shape, dtype=values.dtype).index_put((g, j), values)


def _needed_captions(rewards: Tensor, cmask: Tensor, best: Tensor, config: DPOConfig) -> Tensor:
    """[G, K] bool: captions in a valid pair, plus c* where the video group or NLL uses it."""
    pm = pair_mask(rewards, config.margin, config.pairs, cmask)
    needed = pm.any(dim=2) | pm.any(dim=1)
    if config.lambda_video > 0 or config.lambda_nll > 0:
        needed[torch.arange(len(best)), best] = True
    return needed


def _policy_logps(policy: nn.Module, features: FeatureFn, items: list[tuple]) -> Tensor:
    """One `policy.logprob` call over items (g, j, video_id, caption); features fetched once."""
    if not items:
        return torch.zeros(0)
    ids = sorted({it[2] for it in items})
    feats = features(ids)
    index = {vid: i for i, vid in enumerate(ids)}
    rows = torch.tensor([index[it[2]] for it in items])
    return policy.logprob(feats[rows], [it[3] for it in items])


# ---------------------------------------------------------------- data parallelism

# stat -> index of the count it is a mean over (see _term_counts); means combine across processes
_MEAN_OVER = {"loss_caption": 0, "loss_video": 1, "loss_nll": 2, "reward_acc": 3, "margin": 3,
              "video_acc": 4, "video_margin": 4}
_EMPTY_MEAN = {"loss_caption": 0.0, "loss_video": 0.0, "loss_nll": 0.0}  # else NaN, as in one process


def _local_rows(batch: Sequence[dict]) -> list[dict]:
    """This process's contiguous share of the batch's twin groups (whole groups, batch order)."""
    groups = work_units(batch, lambda row: row.get("group"))
    mine = groups[dist.shard_slice(len(groups))]
    return [row for group in mine for row in group]


def _term_counts(rows: Sequence[dict], config: DPOConfig) -> Tensor:
    """[5] float64 what `dg_dpo_loss` averages over: videos in the caption group, in the video
    group, in the NLL term; caption pairs; (video, twin) entries."""
    if not rows:
        return torch.zeros(5, dtype=torch.float64)
    rewards, cmask = _pad(rows, "rewards", max(len(r["captions"]) for r in rows))
    pm = pair_mask(rewards, config.margin, config.pairs, cmask)  # [G, K, K]
    twins = [len(r.get("negatives", [])) for r in rows] if config.lambda_video > 0 else [0]
    return torch.tensor([float(pm.any(dim=(1, 2)).sum()), float(sum(t > 0 for t in twins)),
                         float(len(rows)) if config.lambda_nll else 0.0, float(pm.sum()), float(sum(twins))],
                        dtype=torch.float64)


def shared_loss(policy: nn.Module, batch: Sequence[dict], features: FeatureFn,
                 config: DPOConfig) -> tuple[Tensor, dict]:
    """(this process's share of the batch loss, the whole batch's stats); every process calls it."""
    rows = _local_rows(batch)
    counts = _term_counts(rows, config)
    total = dist.all_reduce_sum(counts.clone())
    weights = tuple((counts[:3] / total[:3].clamp(min=1)).tolist())  # local share of each term's videos
    loss, stats = batch_loss(policy, rows, features, config, weights) if rows else (torch.zeros(()), {})
    return loss, _combine_stats(stats, counts, total, config)


def _combine_stats(stats: dict, counts: Tensor, total: Tensor, config: DPOConfig) -> dict:
    """The stats one process would log for the whole batch: count-weighted means, summed counts."""
    keys = ["loss_caption", "n_pairs", "videos_without_pairs", "reward_acc", "margin", "loss_video",
            "video_acc", "video_margin"] + (["loss_nll"] if config.lambda_nll else []) + ["loss"]
    vals = []
    for key in keys:
        weight = counts[_MEAN_OVER[key]] if key in _MEAN_OVER else 1.0
        vals.append(stats.get(key, 0.0) * weight if weight > 0 else 0.0)  # NaN means of no items drop out
    summed = dist.all_reduce_sum(torch.tensor(vals, dtype=torch.float64)).tolist()
    out = {}
    for key, val in zip(keys, summed):
        if key in _MEAN_OVER:
            n = float(total[_MEAN_OVER[key]])
            out[key] = val / n if n > 0 else _EMPTY_MEAN.get(key, float("nan"))
        else:
            out[key] = int(round(val)) if key != "loss" else val
    return out
