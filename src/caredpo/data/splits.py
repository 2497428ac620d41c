"""The run's rules for the splits and queries of a data set on disk (`caredpo run --data DIR`).

Every stage and `caredpo eval --run` read the data set through `prepare` (then `with_features`),
so they all see the same splits and queries:

- **No test split** (the plain layout without a split column; MSR-VTT without the 1k-A file; a
  DiDeMo / ActivityNet / MSVD folder without its test file): a seeded hold-out of TEST_FRACTION of
  the training videos, whole twin groups at a time, at least one video and leaving at least one, is
  the test split.
- **Queries**: a test video's listed queries where the layout has them (MSR-VTT 1k-A, the DiDeMo /
  ActivityNet paragraphs); otherwise (MSVD, the plain layout) its first sentence, as in MSR-VTT 1k-A
  (one query per test video), so its other sentences are what the oracle arm (reference captions)
  draws from. A test video with one sentence has it as its query and no oracle caption.
- **A split with no videos** (no training videos; or every test video skipped by --skip-bad): an
  error naming the split.

TwinClips already has both splits and one query per test clip: `prepare` returns it unchanged.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import replace

from ..records import DataError, Dataset

TEST_FRACTION = 0.2  # share of the videos held out as the test split where a layout has none
RUN_SPLITS = ("train", "test")  # the splits a run trains and evaluates on


def prepare(dataset: Dataset, seed: int) -> tuple[Dataset, list[str]]:
    """(the data set with a test split and queries for every test video, notes: one line per
    rule applied, for the run log)."""
    notes: list[str] = []
    if not dataset.split("test"):
        dataset = hold_out_test(dataset, seed)
        notes.append(
            f"{dataset.name}: no test split; held out {len(dataset.split('test'))} of "
            f"{len(dataset.videos)} videos as test (seed {seed}, {TEST_FRACTION:.0%})"
        )
    missing = [v.id for v in dataset.split("test") if not dataset.queries.get(v.id)]
    if missing:
        queries = {**dataset.queries, **{v: dataset.sentences_of(v)[:1] for v in missing}}
        dataset = Dataset(dataset.root, dataset.videos, dataset.sentences, queries, dataset.name)
        notes.append(
            f"{dataset.name}: {len(missing)} test videos without listed queries: the first sentence "
            "of each is its query, the others the oracle's captions"
        )
    return dataset, notes


def hold_out_test(dataset: Dataset, seed: int) -> Dataset:
    """The data set with a seeded TEST_FRACTION of its training units moved to the test split."""
    units = dataset.units(v.id for v in dataset.split("train"))
    if len(units) < 2:
        raise DataError(
            f"{dataset.root}: split 'test' has no videos, and {len(units)} training videos "
            "cannot be split into train and test"
        )
    order = list(range(len(units)))
    random.Random(f"holdout-{seed}").shuffle(order)
    want = max(1, round(TEST_FRACTION * sum(map(len, units))))
    test: set[str] = set()
    for i in order[:-1]:  # at least one unit stays for training
        if len(test) >= want:
            break
        test.update(units[i])
    videos = [replace(v, split="test") if v.id in test else v for v in dataset.videos]
    return Dataset(dataset.root, videos, dataset.sentences, dataset.queries, dataset.name)


def check_splits(dataset: Dataset, splits: Iterable[str] = RUN_SPLITS) -> Dataset:
    """The data set, if each of `splits` has videos; else an error naming the first empty one."""
    for split in splits:
        if not dataset.split(split):
            raise DataError(f"{dataset.root}: split {split!r} has no videos")
    return dataset


def with_features(dataset: Dataset, ids: Iterable[str], features: str = "features") -> Dataset:
    """The data set restricted to the videos that have features (the others were skipped as
    unreadable); a train or test split left empty is an error."""
    have = set(ids)
    if have >= set(dataset.by_id):
        return dataset
    videos = [v for v in dataset.videos if v.id in have]
    kept = Dataset(
        dataset.root,
        videos,
        [s for s in dataset.sentences if s.video_id in have],
        {v: q for v, q in dataset.queries.items() if v in have},
        dataset.name,
    )
    for split in RUN_SPLITS:
        if not kept.split(split):
            raise DataError(
                f"{dataset.root}: split {split!r} has no videos with features "
                f"(every one was skipped: see {features}/skipped.jsonl)"
            )
    return kept
