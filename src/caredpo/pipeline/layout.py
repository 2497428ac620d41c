"""The run folder: every path a stage reads or writes, in one place.

    RUN/data/                        TwinClips mp4s + annotations.json (a generated run)
    RUN/data/features/               cached frame features (RUN/features/ for data on disk, below)
    RUN/captioner/<arm>/             sft: the SFT captioner; dpo, dg_dpo: the tuned ones (a trainer's folder)
    RUN/captioner/<arm>/model/       what `VideoCaptioner.from_pretrained` reads
    RUN/captions/<arm>_<split>.jsonl greedy captions (sft_train: the retrievers' pool and the twins')
    RUN/retriever/<name>/model/      one retriever per `presets.RETRIEVERS` entry (a trainer's folder)
    RUN/reranker/<name>/model/       one MLLM reranker per `presets.RERANKERS` entry (presets that have them)
    RUN/prefs/groups.jsonl           preference groups with reference log-probs
    RUN/stages/<stage>.json          a stage's marker: written when it finished
    RUN/run.json, run.log            the run's preset, seed, config and data folder; progress lines
    RUN/results.json                 the comparison (`report.evaluate_run`), plots, captions.md

A trainer's folder (`TrainerFiles`; the names are `caredpo.training`'s, which every trainer writes):

    model/  log.jsonl (a row a step)  metrics.json (final numbers)  train_config.json  checkpoint/

A layout over a data set already on disk (`RunLayout.create(RUN, data=DIR)`, or run.json's "data";
`caredpo run` itself always generates TwinClips) reads the data from DIR and writes nothing into
it: its features go to RUN/features.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..data import DataSource
from ..io import read_json
from ..training import CHECKPOINT_DIR, CONFIG_FILE, LOG_FILE, SUMMARY_FILE

RUN_JSON = "run.json"
MODEL_DIR = "model"  # a trainer's model, in the model's own format (`save_pretrained`)


@dataclass(frozen=True)
class TrainerFiles:
    """The files a trainer (captioner SFT, retriever, DG-DPO) writes into its output folder."""

    root: Path

    @property
    def model(self) -> Path:
        return self.root / MODEL_DIR

    @property
    def log(self) -> Path:
        return self.root / LOG_FILE

    @property
    def metrics(self) -> Path:
        return self.root / SUMMARY_FILE

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def checkpoint(self) -> Path:
        return self.root / CHECKPOINT_DIR

    @property
    def finished(self) -> bool:
        """True once the trainer wrote its final numbers and its model."""
        return self.metrics.exists() and (self.model / "config.json").exists()


@dataclass(frozen=True)
class RunLayout:
    root: Path
    data: Path  # the data set folder (any layout `load_dataset` reads)
    features: Path  # the FeatureStore folder

    @classmethod
    def create(cls, root: str | Path, data: str | Path | None = None) -> RunLayout:
        """A generated run keeps its data inside (RUN/data); a run on DIR reads DIR."""
        root = Path(root)
        if data is None:
            return cls(root, root / "data", root / "data" / "features")
        return cls(root, Path(data), root / "features")

    @classmethod
    def load(cls, root: str | Path) -> RunLayout:
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

    def captioner_files(self, arm: str) -> TrainerFiles:
        return TrainerFiles(self.captioner(arm))

    def captioner_model(self, arm: str) -> Path:
        return self.captioner_files(arm).model

    def retriever(self, name: str) -> Path:
        return self.root / "retriever" / name

    def retriever_files(self, name: str) -> TrainerFiles:
        return TrainerFiles(self.retriever(name))

    def retriever_model(self, name: str) -> Path:
        return self.retriever_files(name).model

    def reranker(self, name: str) -> Path:
        return self.root / "reranker" / name

    def reranker_model(self, name: str) -> Path:
        return TrainerFiles(self.reranker(name)).model

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
