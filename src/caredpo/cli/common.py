"""Helpers shared by the stage commands: the preset every command starts from, threads, loading."""

from __future__ import annotations

from pathlib import Path

import typer

from ..records import DataError

# Every stage command starts from the configs `caredpo run --preset P --seed S` uses; options override.
PRESET = typer.Option(
    "default",
    "--preset",
    help="smoke | default | full: the configs `caredpo run` uses; options given replace single fields.",
)
SEED = typer.Option(0, "--seed", help="seed of the run (every config's seed follows from it, as in `caredpo run`)")
THREADS = typer.Option(0, "--threads", help="torch threads (0: torch's default).")


def preset_config(preset: str, seed: int):
    """`run_config(preset, seed)`; an unknown preset is one line (DataError)."""
    from ..pipeline.presets import PRESETS, run_config

    if preset not in PRESETS:
        raise DataError(f"--preset {preset!r}: choose one of {sorted(PRESETS)}")
    return run_config(preset, seed)


def set_threads(n: int) -> None:
    """--threads: torch's intra-op threads (0 keeps torch's default). One per process is best when
    another job shares the cores: oversubscribed matmuls run many times slower."""
    if n > 0:
        import torch

        torch.set_num_threads(n)


def read_data(data: Path, seed: int):
    """The data set of a folder with the split and query rules of `caredpo run --data` (a seeded
    test hold-out where it has no test split, one query per test video: `caredpo.data.splits`);
    each rule applied is one line on stderr."""
    from ..data import DataSource
    from ..pipeline.stages import run_dataset

    return run_dataset(DataSource(data), seed, log=lambda line: typer.echo(line, err=True))


def load_data(data: Path, features: Path | None, seed: int):
    """(Dataset, FeatureStore) of a data folder as `caredpo run` reads it (`read_data`, then only the
    videos with features); features default to DATA/features."""
    from ..data.splits import with_features
    from ..features import FeatureStore

    path = features or data / "features"
    store = FeatureStore.load(path)
    return with_features(read_data(data, seed), store.ids, str(path)), store


def load_captioner(captioner: str | Path, model_path: Path | None = None):
    """`--captioner FOLDER` (our captioner) or `--captioner hf --model-path PATH` (a Hugging Face
    video MLLM; `caredpo.captioner.base.load_captioner`)."""
    from ..captioner.base import load_captioner as load

    check_captioner_args(captioner, model_path)
    return load(captioner, model_path)


def check_captioner_args(captioner: str | Path, model_path: Path | None) -> None:
    """`--captioner hf` goes with `--model-path`, and `--model-path` only with it."""
    if str(captioner) == "hf" and model_path is None:
        raise typer.BadParameter("--captioner hf needs --model-path PATH (a local Hugging Face model folder)")
    if str(captioner) != "hf" and model_path is not None:
        raise typer.BadParameter("--model-path is only used with --captioner hf")
