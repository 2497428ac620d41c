"""The records every data set is read into: videos, sentences, queries.

TwinClips, MSR-VTT, DiDeMo, ActivityNet Captions and MSVD all become one `Dataset`, so every
later stage (features, captioner, retriever, preferences, evaluation) reads one shape.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# Twin groups. TwinClips puts 4 look-alike clips in a group (`Video.group`); each is the others'
# hard negative, and stages that batch videos take whole groups so both directions of a twin pair
# meet. A *work unit* is a whole twin group, or a lone video. The one rule for data without twin
# groups (every real benchmark): each video is a unit of its own; its hard negatives are its
# nearest videos by the retriever's video embedding (`caredpo.dpo.prefs.hard_negatives`), and the
# retriever fills a batch with TWIN_GROUP_SIZE lone videos per twin group it would have taken.
TWIN_GROUP_SIZE = 4  # clips per TwinClips twin group


def work_units(items: Iterable[T], group_of: Callable[[T], Hashable | None]) -> list[list[T]]:
    """Items by twin group in order of first appearance; an item whose group is None is a unit
    alone (its own id never merges it with a group of the same name)."""
    units: dict[tuple, list[T]] = {}
    for i, item in enumerate(items):
        g = group_of(item)
        units.setdefault(("group", g) if g is not None else ("alone", i), []).append(item)
    return list(units.values())


class DataError(ValueError):
    """Bad input data. The message is one line: the file, the entry and what is wrong."""


class NonFiniteLossError(RuntimeError):
    """A loss or gradient norm became NaN/inf; training stopped before the bad update."""


@dataclass(frozen=True)
class Video:
    id: str
    path: str  # relative to Dataset.root (or absolute)
    split: str  # "train" | "val" | "test"
    group: str | None = None  # twin group (TwinClips) — the hard negatives of this video
    factors: Mapping[str, Any] = field(default_factory=dict)  # generating factors, for people
    source: str | None = None  # where the annotations name it ("captions.csv: line 7"), for messages


@dataclass(frozen=True)
class Sentence:
    video_id: str
    text: str
    specificity: str | None = None  # "generic" | "medium" | "specific" where known


@dataclass
class Dataset:
    """Videos, their reference sentences, and the evaluation queries of each test video."""

    root: Path
    videos: list[Video]
    sentences: list[Sentence]
    # video id -> query sentences. MSR-VTT 1k-A style: one per test video; an empty dict
    # means "every sentence of a test video is a query".
    queries: dict[str, list[str]] = field(default_factory=dict)
    name: str = "dataset"

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        ids = [v.id for v in self.videos]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise DataError(f"{self.root}: video id {dup!r} appears more than once")
        known = set(ids)
        for s in self.sentences:
            if s.video_id not in known:
                raise DataError(f"{self.root}: sentence {s.text!r} names unknown video {s.video_id!r}")
            if not s.text.strip():
                raise DataError(f"{self.root}: empty sentence for video {s.video_id!r}")

    @cached_property
    def by_id(self) -> dict[str, Video]:
        return {v.id: v for v in self.videos}

    @cached_property
    def _sentences_by_video(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = defaultdict(list)
        for s in self.sentences:
            out[s.video_id].append(s.text)
        return dict(out)

    def sentences_of(self, video_id: str) -> list[str]:
        return self._sentences_by_video.get(video_id, [])

    @cached_property
    def _specific_by_video(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = defaultdict(list)
        for s in self.sentences:
            if s.specificity == "specific":
                out[s.video_id].append(s.text)
        return dict(out)

    def specific_sentences_of(self, video_id: str) -> list[str]:
        """The sentences that can tell a video from its look-alikes: those marked "specific" where
        the data set marks specificity (TwinClips), else every sentence (real data sets)."""
        return self._specific_by_video.get(video_id) or self.sentences_of(video_id)

    def split(self, name: str) -> list[Video]:
        return [v for v in self.videos if v.split == name]

    def video_path(self, video: Video) -> Path:
        p = Path(video.path)
        return p if p.is_absolute() else self.root / p

    def queries_of(self, video_id: str) -> list[str]:
        """The evaluation queries of a video: its listed queries, else all its sentences."""
        return self.queries.get(video_id) or self.sentences_of(video_id)

    def group_key(self, video_id: str) -> str:
        """The name of a video's work unit: its twin group, else its own id (seeds, headings)."""
        return self.by_id[video_id].group or video_id

    def units(self, video_ids: Iterable[str]) -> list[list[str]]:
        """Work units of these videos (see `work_units`): whole twin groups, lone videos alone."""
        return work_units(video_ids, lambda v: self.by_id[v].group)

    def has_twin_groups(self, video_ids: Iterable[str]) -> bool:
        """True when every one of these videos is in a twin group (TwinClips); data with no or
        only some groups takes the lone-video rule above."""
        return all(self.by_id[v].group is not None for v in video_ids)

    def twins_of(self, video_id: str) -> list[str]:
        """Other videos of the same twin group (empty where the data set has no groups)."""
        g = self.by_id[video_id].group
        if g is None:
            return []
        return [v.id for v in self.videos if v.group == g and v.id != video_id]


# name -> the reference sentences of a video that a stage draws from (SFT targets, retriever queries
# and captions, reward queries): "all", or "specific" (`Dataset.specific_sentences_of`)
SENTENCE_POOLS: dict[str, Callable[[Dataset, str], list[str]]] = {
    "all": Dataset.sentences_of,
    "specific": Dataset.specific_sentences_of,
}


def check_pool(name: str, owner: str) -> None:
    if name not in SENTENCE_POOLS:
        raise ValueError(f"{owner} must be one of {sorted(SENTENCE_POOLS)}, got {name!r}")
