"""`caredpo run`: the whole experiment, resumable: on the embedded TwinClips data, or on a data set
already on disk (`--data DIR`: MSR-VTT, DiDeMo, ActivityNet, MSVD or the plain layout).

    caredpo run --preset default --seed 0 --out runs/default-s0
    caredpo run --data /data/myclips --preset default --seed 0 --out runs/myclips-s0
"""

from __future__ import annotations

from pathlib import Path

import typer

from ..data.loaders import PlainColumns
from .flags import NO_OVERRIDES, Overrides, config_flags


def register(root: typer.Typer) -> None:
    root.command(
        "run",
        help="Run every stage (data .. evaluation) on TwinClips or, with --data DIR, on a data set "
        "on disk, and print the results table.",
    )(run)
    root.command("summary", help="Mean ± std over seeds of finished runs' results.")(summary)


@config_flags(columns=PlainColumns)
def run(
    preset: str = typer.Option("default", "--preset", help="smoke | default"),
    seed: int = typer.Option(0, "--seed", help="seed of every stage"),
    out: Path | None = typer.Option(None, "--out", help="run folder (default runs/<preset>-s<seed>)"),
    only: str | None = typer.Option(None, "--only", help="comma-separated stage names to run (others skipped)"),
    data: Path | None = typer.Option(
        None,
        "--data",
        help="a data set on disk instead of generated TwinClips: "
        'any layout `caredpo data info` reads (README, "Your own data")',
    ),
    format: str = typer.Option(
        "auto",
        "--format",
        help="--data layout: auto, msrvtt, didemo, activitynet, msvd, plain (auto: from the files present)",
    ),
    skip_bad: bool = typer.Option(
        False, "--skip-bad", help="list missing and unreadable videos in features/skipped.jsonl and go on without them"
    ),
    overrides: Overrides = NO_OVERRIDES,
) -> None:
    from ..data import DataSource
    from ..pipeline.presets import PRESETS
    from ..pipeline.run import run_pipeline
    from ..pipeline.stages import STAGES
    from ..records import DataError

    if preset not in PRESETS:
        raise DataError(f"--preset {preset!r}: choose one of {sorted(PRESETS)}")
    stages = only.split(",") if only else None
    unknown = sorted(set(stages or []) - set(STAGES))
    if unknown:
        raise DataError(f"--only: unknown stages {unknown}; stages are {list(STAGES)}")
    columns = overrides.apply("columns", PlainColumns()) if overrides.given("columns") else None
    if data is None and (columns or format != "auto"):
        raise DataError("--format and the column options describe --data DIR; give --data")
    source = DataSource(data.resolve(), format, columns) if data is not None else None
    run_pipeline(preset, seed, out or Path("runs") / f"{preset}-s{seed}", stages, data=source, skip_bad=skip_bad)


def summary(runs: list[Path] = typer.Argument(..., help="finished run folders (one per seed)")) -> None:
    """Mean ± standard deviation over seeds of every arm's headline numbers."""
    from ..io import read_json
    from ..pipeline.layout import RunLayout
    from ..pipeline.report import aggregate, aggregate_factors, print_factors, print_summary

    results = [read_json(RunLayout.load(r).results) for r in runs]
    print_summary(aggregate([r["arms"] for r in results]), f"mean ± std over {len(runs)} run(s)")
    if all(r.get("caption_factors") for r in results):
        print_factors(
            aggregate_factors([r["caption_factors"] for r in results]),
            f"test captions stating each clip factor right (%), mean ± std over {len(runs)} run(s)",
        )
