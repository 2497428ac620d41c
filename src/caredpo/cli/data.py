"""`caredpo data ...` (make and inspect data sets) and the top-level `caredpo features`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..records import DataError

# Option errors are raised as DataError: main() turns them into one line and exit code 2.
app = typer.Typer(no_args_is_help=True, add_completion=False, help="Make and inspect data sets.")


@app.command("twinclips")
def twinclips(
    out: Path = typer.Option(..., "--out", help="Folder to write annotations.json and videos/ into."),
    preset: str = typer.Option("smoke", "--preset", help="smoke (a few dozen clips) or default (hundreds)."),
    seed: int = typer.Option(0, "--seed", help="Everything generated follows from this seed."),
) -> None:
    """Generate the TwinClips data set (real mp4 files + MSR-VTT-shaped annotations)."""
    from ..data.twinclips import TwinClipsConfig, generate_twinclips

    try:
        config = TwinClipsConfig.preset(preset, seed)
    except (ValueError, KeyError) as e:
        raise DataError(f"--preset {preset!r}: {str(e).strip(chr(39))}") from None
    generate_twinclips(config, out)
    typer.echo(str(out))


@app.command("info")
def info(data: Path = typer.Option(..., "--data", help="Data folder (any supported layout)."),
         format: str = typer.Option("auto", "--format", help="auto, twinclips, msrvtt, didemo, activitynet, msvd.")) -> None:
    """Print the number of videos, sentences and queries per split."""
    from ..data import load_dataset

    ds = load_dataset(data, format)
    for split in sorted({v.split for v in ds.videos}):
        vids = ds.split(split)
        n_sent = sum(len(ds.sentences_of(v.id)) for v in vids)
        n_query = sum(len(ds.queries.get(v.id, [])) for v in vids)
        typer.echo(f"{ds.name} {split}: {len(vids)} videos, {n_sent} sentences, {n_query} queries")


def features(
    data: Path = typer.Option(..., "--data", help="Data folder (any supported layout)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Features folder (default: DATA/features)."),
    frames: int = typer.Option(8, "--frames", help="Frames sampled per video."),
    size: int = typer.Option(128, "--size", help="Frame side in pixels (>= 32)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Frames per CNN forward pass."),
    workers: int = typer.Option(1, "--workers", help="Decoding threads running alongside the CNN."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="List unreadable videos in skipped.jsonl instead of stopping."),
    format: str = typer.Option("auto", "--format", help="Data format (auto-detected by default)."),
) -> None:
    """Frozen EfficientNet-Lite0 features of every video (resumable; reuses a finished cache)."""
    from ..data import load_dataset
    from ..features import FeatureConfig, FeatureStore, extract_features

    try:
        config = FeatureConfig(num_frames=frames, size=size, batch_size=batch_size, decode_workers=workers)
    except ValueError as e:
        raise DataError(f"bad option: {e}") from None
    dataset = load_dataset(data, format)
    path = extract_features(dataset, out or Path(data) / "features", config, skip_bad=skip_bad)
    store = FeatureStore.load(path)
    skipped = len(store.meta.get("skipped", []))
    note = f", {skipped} skipped (see {path / 'skipped.jsonl'})" if skipped else ""
    typer.echo(f"{path}: {len(store.ids)} videos x {store.num_frames} frames{note}")


def register(root: typer.Typer) -> None:
    """Top-level commands of this area: `caredpo features`."""
    root.command("features")(features)
