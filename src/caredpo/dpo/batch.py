"""One DG-DPO batch: preference rows -> a typed `PrefBatch` -> the policy's log-probs of only the
pairs the loss uses -> the loss terms (`loss.dg_dpo_terms`) and their stats (`stats.DPOStats`).

`batch_loss` is the whole batch in one process. Under `torchrun` (`caredpo.dist`) `shared_loss`
gives each process the contiguous share of the batch's twin groups, weights its loss terms by its
share of the videos each term averages over, and combines the stats, so the summed gradients and
the logged numbers equal one process's on the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import dist
from ..records import DataError, work_units
from .config import DPOConfig
from .loss import TERMS, dg_dpo_terms, pair_mask, weighted_sum
from .stats import DPOStats, from_sums, weighted_sums

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


@dataclass(frozen=True)
class PrefBatch:
    """G preference rows (see `dpo.train` for the format) as tensors; K captions and M twins a row,
    ragged ones padded and masked."""

    rows: tuple[dict, ...]
    rewards: Tensor  # [G, K] float64 retrieval rewards
    caption_mask: Tensor  # [G, K] bool
    ref_logps: Tensor  # [G, K] float64 log pi_ref(c_k | v)
    best: Tensor  # [G] long: index of c*
    ref_cross: Tensor | None  # [G, M] float64 log pi_ref(c* | twin_j); None: no video group
    cross_mask: Tensor | None  # [G, M] bool
    lengths: Tensor | None  # [G, K] float64 caption token counts; None: no NLL term

    @classmethod
    def from_rows(cls, rows: Sequence[dict], config: DPOConfig) -> PrefBatch:
        if config.lambda_nll and any("lengths" not in r for r in rows):
            raise DataError("lambda_nll > 0 needs 'lengths' (caption token counts) in every preference row")
        k = max(len(r["captions"]) for r in rows)
        rewards, cmask = _pad(rows, "rewards", k)
        cross = (None, None)
        if config.lambda_video > 0:  # else no twin log-probs are computed at all
            cross = _pad(rows, "ref_cross_logps", max(len(r.get("negatives", [])) for r in rows))
        lengths = _pad(rows, "lengths", k, 1.0)[0] if config.lambda_nll else None
        return cls(
            tuple(rows),
            rewards,
            cmask,
            _pad(rows, "ref_logps", k)[0],
            torch.tensor([r["best"] for r in rows]),
            *cross,
            lengths,
        )

    def own_items(self, needed: Tensor) -> list[tuple]:
        """(g, j, video id, caption j) for the needed [G, K] captions under their own video."""
        return [
            (g, j, r["video_id"], r["captions"][j])
            for g, r in enumerate(self.rows)
            for j in range(len(r["captions"]))
            if needed[g, j]
        ]

    def cross_items(self) -> list[tuple]:
        """(g, j, twin j, c*) for every twin of every row (empty without a video group)."""
        if self.ref_cross is None:
            return []
        return [
            (g, j, u, r["captions"][r["best"]])
            for g, r in enumerate(self.rows)
            for j, u in enumerate(r.get("negatives", []))
        ]


def batch_terms(
    policy: nn.Module, rows: Sequence[dict], features: FeatureFn, config: DPOConfig
) -> tuple[dict[str, Tensor], DPOStats]:
    """Policy log-probs of only the (video, caption) pairs the loss uses, in one `logprob` call,
    then the unweighted loss terms and their stats (`dg_dpo_terms`)."""
    batch = PrefBatch.from_rows(rows, config)
    own, cross = batch.own_items(_needed_captions(batch, config)), batch.cross_items()
    logps = _policy_logps(policy, features, own + cross)
    dtype = logps.dtype
    pol = _scatter(logps[: len(own)], own, tuple(batch.rewards.shape))
    video = batch.ref_cross is not None
    return dg_dpo_terms(
        pol,
        batch.ref_logps.to(dtype),
        batch.rewards.to(dtype),
        _scatter(logps[len(own) :], cross, tuple(batch.ref_cross.shape)) if video else None,
        batch.ref_cross.to(dtype) if video else None,
        config.beta,
        config.margin,
        pairs=config.pairs,
        caption_mask=batch.caption_mask,
        cross_mask=batch.cross_mask,
        best=batch.best,
        lengths=batch.lengths,
    )


def batch_loss(
    policy: nn.Module, rows: Sequence[dict], features: FeatureFn, config: DPOConfig
) -> tuple[Tensor, DPOStats]:
    """(L of the batch, its stats) in one process."""
    terms, stats = batch_terms(policy, rows, features, config)
    loss = weighted_sum(terms, config.lambdas)
    return loss, stats.with_loss(float(loss.detach()))


def _scatter(values: Tensor, items: list[tuple], shape: tuple[int, int]) -> Tensor:
    """[N] log-probs of items (g, j, ...) -> [G, W] (zeros elsewhere; masked in the loss)."""
    if not items:
        return torch.zeros(shape, dtype=values.dtype)
    g = torch.tensor([it[0] for it in items])
    j = torch.tensor([it[1] for it in items])
    return torch.zeros(shape, dtype=values.dtype).index_put((g, j), values)


def _needed_captions(batch: PrefBatch, config: DPOConfig) -> Tensor:
    """[G, K] bool: captions in a valid pair, plus c* where the video group or NLL uses it."""
    pm = pair_mask(batch.rewards, config.margin, config.pairs, batch.caption_mask)
    needed = pm.any(dim=2) | pm.any(dim=1)
    if config.lambda_video > 0 or config.lambda_nll > 0:
        needed[torch.arange(len(batch.best)), batch.best] = True
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


def _local_rows(batch: Sequence[dict]) -> list[dict]:
    """This process's contiguous share of the batch's twin groups (whole groups, batch order)."""
    groups = work_units(batch, lambda row: row.get("group"))
    mine = groups[dist.shard_slice(len(groups))]
    return [row for group in mine for row in group]


def shared_loss(
    policy: nn.Module, batch: Sequence[dict], features: FeatureFn, config: DPOConfig
) -> tuple[Tensor, DPOStats]:
    """(this process's share of the batch loss, the whole batch's stats); every process calls it.
    Each term is weighted by this process's share of the videos it averages over."""
    rows = _local_rows(batch)
    terms, stats = batch_terms(policy, rows, features, config) if rows else ({}, DPOStats())
    mine = torch.tensor(stats.term_videos(TERMS), dtype=torch.float64)
    total = dist.all_reduce_sum(mine.clone())
    shares = dict(zip(TERMS, (mine / total.clamp(min=1)).tolist()))
    loss = weighted_sum(terms, config.lambdas, shares) if rows else torch.zeros(())
    summed = dist.all_reduce_sum(
        torch.tensor(weighted_sums(stats.with_loss(float(loss.detach()))), dtype=torch.float64)
    )
    return loss, from_sums(summed.tolist())
