"""The run folder: every path a stage reads or writes, in one place.

    RUN/data/                        TwinClips mp4s + annotations.json (a generated run)
    RUN/data/features/               cached frame features (RUN/features/ when --data DIR is given)
    RUN/captioner/<arm>/             sft: the SFT captioner; dpo, dg_dpo: the tuned ones
    RUN/captioner/<arm>/model/       what `VideoCaptioner.from_pretrained` reads
    RUN/captions/<arm>_<split>.jsonl greedy captions (sft_train: the retrievers' pool and the twins')
    RUN/retriever/<name>/model/      one retriever per `presets.RETRIEVERS` entry
    RUN/prefs/groups.jsonl           preference groups with reference log-probs
    RUN/stages/<stage>.json          a stage's marker: written when it finished
    RUN/run.json, run.log            the run's preset, seed, config and data folder; progress lines
    RUN/results.json                 the comparison (`report.evaluate_run`), plots, captions.md

A run on a data set already on disk (`caredpo run --data DIR`) reads the data from DIR and writes
nothing into it: its features go to RUN/features.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..data import DataSource
from ..io import read_json

RUN_JSON = "run.json"


@dataclass(frozen=True)
class RunLayout:
    root: Path
    data: Path  # the data set folder (any layout `load_dataset` reads)
    features: Path  # the FeatureStore folder

    @classmethod
    def create(cls, root: str | Path, data: str | Path | None = None) -> "RunLayout":
        """A generated run keeps its data inside (RUN/data); a run on DIR reads DIR."""
        root = Path(root)
        if data is None:
            return cls(root, root / "data", root / "data" / "features")
        return cls(root, Path(data), root / "features")

    @classmethod
    def load(cls, root: str | Path) -> "RunLayout":
        """The layout of an existing run folder: its data folder as run.json records it."""
        root = Path(root)
        data = _recorded_source(root / RUN_JSON)
        return cls.create(root, data["path"] if data else None)

    def data_source(self) -> DataSource:
        """How this run reads its data set: as run.json records it (a --data run), else RUN/data."""
        recorded = _recorded_source(self.run_json)
        return DataSource.from_dict(recorded) if recorded else DataSource(self.data)

    @property
    def generated(self) -> bool:
        """True for a TwinClips run (the data stage writes RUN/data); False for --data DIR."""
        return self.data == self.root / "data"

    # ---- models
    def captioner(self, arm: str) -> Path:
        return self.root / "captioner" / arm

    def captioner_model(self, arm: str) -> Path:
        return self.captioner(arm) / "model"

    def retriever(self, name: str) -> Path:
        return self.root / "retriever" / name

    def retriever_model(self, name: str) -> Path:
        return self.retriever(name) / "model"

    # ---- data products
    def captions(self, arm: str, split: str) -> Path:
        return self.root / "captions" / f"{arm}_{split}.jsonl"

    @property
    def prefs(self) -> Path:
        return self.root / "prefs"

    @property
    def groups(self) -> Path:
        from ..dpo.prefs import GROUPS_FILE

        return self.prefs / GROUPS_FILE

    # ---- bookkeeping and report
    def marker(self, stage: str) -> Path:
        return self.root / "stages" / f"{stage}.json"

    def markers(self) -> list[Path]:
        return sorted((self.root / "stages").glob("*.json"))

    @property
    def run_json(self) -> Path:
        return self.root / RUN_JSON

    @property
    def log(self) -> Path:
        return self.root / "run.log"

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    @property
    def results_queries(self) -> Path:
        """Where `caredpo eval --run RUN --queries Q` writes by default."""
        return self.root / "results_queries.json"

    @property
    def r1_plot(self) -> Path:
        return self.root / "r1_per_arm.png"

    @property
    def dpo_plot(self) -> Path:
        return self.root / "dpo_curves.png"

    @property
    def caption_examples(self) -> Path:
        return self.root / "captions.md"


def _recorded_source(run_json: Path) -> dict | None:
    """run.json's "data" entry (`DataSource.to_dict`); None for a generated run or no run.json."""
    return read_json(run_json).get("data") if run_json.exists() else None
