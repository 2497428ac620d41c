"""One look for long work: rich progress bars with counts, rates and time left.

with progress_bar() as bar:
    task = bar.add_task("features", total=n, unit="frames")
    bar.advance(task, 16)
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class RateColumn(ProgressColumn):
    """Items per second, with the task's `unit` field (default "it")."""

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "it")
        if task.speed is None:
            return Text(f"-- {unit}/s", style="progress.data.speed")
        return Text(f"{task.speed:,.1f} {unit}/s", style="progress.data.speed")


def console() -> Console:
    """Progress and tables for people go to stderr; stdout stays for results."""
    return Console(stderr=True)


def progress_bar(*extra: ProgressColumn | str, show: bool = True) -> Progress:
    """Description, bar, done/total, rate, elapsed, ETA, plus any extra columns (e.g. loss).
    show=False (tests, quiet callers) and torchrun ranks other than 0 (also when a stage runs
    there alone, `dist.alone`) get a disabled bar: the same calls, nothing drawn."""
    from .dist import group_rank, is_main

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        *extra,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console(),
        disable=not (show and is_main() and group_rank() == 0),
    )
