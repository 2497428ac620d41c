"""`caredpo data ...` (make and inspect data sets) and the top-level `caredpo features`."""

from __future__ import annotations

from pathlib import Path

import typer

from ..data.twinclips import TwinClipsConfig
from ..features import FeatureConfig
from .common import PRESET, SEED, preset_config
from .flags import NO_OVERRIDES, Overrides, config_flags

# Option errors are raised as DataError: main() turns them into one line and exit code 2.
app = typer.Typer(no_args_is_help=True, add_completion=False, help="Make and inspect data sets.")


@app.command("twinclips")
@config_flags(data=TwinClipsConfig)
def twinclips(
    out: Path = typer.Option(..., "--out", help="Folder to write annotations.json and videos/ into."),
    preset: str = PRESET,
    seed: int = SEED,
    overrides: Overrides = NO_OVERRIDES,
) -> None:
    """Generate the TwinClips data set (real mp4 files + MSR-VTT-shaped annotations)."""
    from ..pipeline.stages import make_twinclips

    make_twinclips(overrides.apply("data", preset_config(preset, seed).data), out)
    typer.echo(str(out))


@app.command("info")
def info(
    data: Path = typer.Option(..., "--data", help="Data folder (any supported layout)."),
    format: str = typer.Option("auto", "--format", help="auto, twinclips, msrvtt, didemo, activitynet, msvd."),
) -> None:
    """Print the number of videos, sentences and queries per split."""
    from ..data import load_dataset

    ds = load_dataset(data, format)
    for split in sorted({v.split for v in ds.videos}):
        vids = ds.split(split)
        n_sent = sum(len(ds.sentences_of(v.id)) for v in vids)
        n_query = sum(len(ds.queries.get(v.id, [])) for v in vids)
        typer.echo(f"{ds.name} {split}: {len(vids)} videos, {n_sent} sentences, {n_query} queries")


@config_flags(features=FeatureConfig)
def features(
    data: Path = typer.Option(..., "--data", help="Data folder (any supported layout)."),
    out: Path | None = typer.Option(None, "--out", help="Features folder (default: DATA/features)."),
    skip_bad: bool = typer.Option(
        False, "--skip-bad", help="List unreadable videos in skipped.jsonl instead of stopping."
    ),
    format: str = typer.Option("auto", "--format", help="Data format (auto-detected by default)."),
    preset: str = PRESET,
    seed: int = SEED,
    overrides: Overrides = NO_OVERRIDES,
) -> None:
    """Frozen EfficientNet-Lite0 features of every video (resumable; reuses a finished cache)."""
    from ..data import load_dataset
    from ..pipeline.stages import make_features

    config = overrides.apply("features", preset_config(preset, seed).features)
    path = out or Path(data) / "features"
    done = make_features(load_dataset(data, format), path, config, skip_bad=skip_bad)
    note = f", {done['skipped']} skipped (see {path / 'skipped.jsonl'})" if done["skipped"] else ""
    typer.echo(f"{path}: {done['videos']} videos x {config.num_frames} frames{note}")


def register(root: typer.Typer) -> None:
    """Top-level commands of this area: `caredpo features`."""
    root.command("features")(features)
