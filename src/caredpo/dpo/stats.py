"""The statistics of a DG-DPO step: one typed record, each field declaring how it combines.

A field is one of
    mean over a count field (`_mean("n_pairs")`): a per-item average; across processes, the
        count-weighted mean; `empty` when nothing was averaged (0.0 for a loss term, else NaN)
    count (`_count()`): summed across processes
    total (`loss`): this process's share of the batch loss, summed across processes
A loss term `x` has `loss_x` (its mean over videos) and the count `x_videos`; so adding a term is
adding its two fields here and its computation in `loss.dg_dpo_terms`: combining, the empty values
and the readers (progress bar, error messages, logs, report) follow from the fields.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

_NAN = math.nan


def _mean(over: str, empty: float | None = _NAN) -> Any:
    return field(default=empty, metadata={"kind": "mean", "over": over, "empty": empty})


def _count() -> Any:
    return field(default=0, metadata={"kind": "count"})


@dataclass(frozen=True)
class DPOStats:
    loss_caption: float = _mean("caption_videos", 0.0)  # caption group, over videos with a valid pair
    n_pairs: int = _count()  # caption pairs (w, l) in the loss
    videos_without_pairs: int = _count()  # videos whose rewards are all within the margin
    reward_acc: float = _mean("n_pairs")  # share of pairs with h_w > h_l (trl's rewards/accuracies)
    margin: float = _mean("n_pairs")  # mean beta * (h_w - h_l) (trl's rewards/margins)
    loss_video: float = _mean("video_videos", 0.0)  # video group, over videos with twins
    video_acc: float = _mean("twins")  # share of (video, twin) entries with h(v, c*) > h(u, c*)
    video_margin: float = _mean("twins")  # mean beta * (h(v, c*) - h(u, c*))
    loss_nll: float | None = _mean("nll_videos", None)  # per-token NLL of c*; None: the term is off
    loss: float = field(default=0.0, metadata={"kind": "total"})  # L (this process's share of it)
    caption_videos: int = _count()
    video_videos: int = _count()
    nll_videos: int = _count()
    twins: int = _count()  # (video, twin) entries in the video group

    def to_row(self) -> dict[str, Any]:
        """The fields a metrics-log row carries (a term that is off is left out). The counts are
        logged too, so that rows combine again (`combine`)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> DPOStats:
        """Read back a metrics-log row (null, as NaN is written, reads as NaN)."""
        known = {f.name: f for f in fields(cls)}
        return cls(
            **{
                k: (_NAN if v is None and known[k].metadata.get("empty", 0) is not None else v)
                for k, v in row.items()
                if k in known
            }
        )

    def term_losses(self) -> dict[str, float]:
        """loss_x of every term that is on."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name.startswith("loss_") and getattr(self, f.name) is not None
        }

    def term_videos(self, terms) -> list[int]:
        """The count of videos each of `terms` ("caption", "video", ...) averages over."""
        return [getattr(self, f"{t}_videos") for t in terms]

    def with_loss(self, loss: float) -> DPOStats:
        return replace(self, loss=loss)


def weighted_sums(stats: DPOStats) -> list[float]:
    """Per field, what processes add up: a mean times its count (0 with no items), else the value."""
    out = []
    for f in fields(DPOStats):
        value, kind = getattr(stats, f.name), f.metadata["kind"]
        if kind == "mean":
            count = getattr(stats, f.metadata["over"])
            value = value * count if count > 0 else 0.0  # NaN means of no items drop out
        out.append(float(value))
    return out


def combine(records: Iterable[DPOStats]) -> DPOStats:
    """Several batches' stats as one (the steps of a pass; the processes of a step do the same by
    an all-reduce of `weighted_sums`): means weighted by their counts, counts and `loss` summed."""
    return from_sums([sum(column) for column in zip(*map(weighted_sums, records))])


def from_sums(sums: list[float]) -> DPOStats:
    """The whole batch's record from `weighted_sums` added over processes."""
    raw = dict(zip([f.name for f in fields(DPOStats)], sums))
    values = {}
    for f in fields(DPOStats):
        kind = f.metadata["kind"]
        if kind == "mean":
            n = raw[f.metadata["over"]]
            values[f.name] = raw[f.name] / n if n > 0 else f.metadata["empty"]
        else:
            values[f.name] = int(round(raw[f.name])) if kind == "count" else raw[f.name]
    return DPOStats(**values)
