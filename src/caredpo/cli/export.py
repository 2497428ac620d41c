"""`caredpo export-trl`: a finished preference stage's pairs as a `datasets` folder for trl & co.

caredpo export-trl --groups RUN/prefs/groups.jsonl --data RUN/data --out RUN/prefs/trl
caredpo prefs ... --export-trl RUN/prefs/trl          # the same, right after the stage
"""

from __future__ import annotations

from pathlib import Path

import typer


def register(root: typer.Typer) -> None:
    root.command("export-trl", help="Write preference pairs with trl's prompt/chosen/rejected columns.")(export_trl)


def export_trl(
    groups: Path = typer.Option(..., "--groups", help="groups.jsonl of `caredpo prefs`"),
    data: Path = typer.Option(..., "--data", help="the data set folder the groups were made on (video paths)"),
    out: Path = typer.Option(..., "--out", help="output folder (datasets.load_from_disk reads it)"),
    prompt: str | None = typer.Option(None, "--prompt", help="the captioner's instruction (default: ours)"),
    pairs: str = typer.Option("all", "--pairs", help="all (every pair a margin apart) | best_worst"),
    margin: float = typer.Option(0.0, "--margin", help="reward gap a pair needs"),
    conversational: bool = typer.Option(False, "--conversational", help="user/assistant messages, not strings"),
) -> None:
    from ..data import load_dataset
    from ..dpo.export import export_pairs
    from ..dpo.loss import PAIR_MODES

    if pairs not in PAIR_MODES:
        raise typer.BadParameter(f"--pairs must be one of {PAIR_MODES}, got {pairs!r}")
    path = export_pairs(groups, load_dataset(data), out, prompt, margin, pairs, conversational)
    print(f"trl pairs: {path}")
