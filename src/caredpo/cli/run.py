"""`caredpo run`: the whole experiment on the embedded TwinClips data, resumable.

    caredpo run --preset default --seed 0 --out runs/default-s0
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(root: typer.Typer) -> None:
    root.command("run", help="Run every stage (data .. evaluation) and print the results table.")(run)
    root.command("summary", help="Mean ± std over seeds of finished runs' results.")(summary)


def run(
    preset: str = typer.Option("default", "--preset", help="smoke | default"),
    seed: int = typer.Option(0, "--seed", help="seed of every stage"),
    out: Optional[Path] = typer.Option(None, "--out", help="run folder (default runs/<preset>-s<seed>)"),
    only: Optional[str] = typer.Option(None, "--only", help="comma-separated stage names to run (others skipped)"),
) -> None:
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
    run_pipeline(preset, seed, out or Path("runs") / f"{preset}-s{seed}", stages)


def summary(runs: list[Path] = typer.Argument(..., help="finished run folders (one per seed)")) -> None:
    """Mean ± standard deviation over seeds of every arm's headline numbers."""
    from ..io import read_json
    from ..pipeline.layout import RunLayout
    from ..pipeline.report import aggregate, aggregate_factors, print_factors, print_summary

    results = [read_json(RunLayout.load(r).results) for r in runs]
    print_summary(aggregate([r["arms"] for r in results]), f"mean ± std over {len(runs)} run(s)")
    if all(r.get("caption_factors") for r in results):
        print_factors(aggregate_factors([r["caption_factors"] for r in results]),
                      f"test captions stating each clip factor right (%), mean ± std over {len(runs)} run(s)")
