"""`caredpo run`: every stage in order, each skipped when its marker says it finished.

A stage's marker is run/stages/<name>.json ({seconds, peak_rss_mb, ...}); an interrupted stage has
no marker and resumes from its own partial outputs on the next run. Every line of progress also goes
to run/run.log.

`torchrun --nproc_per_node=N --no-python caredpo run ...` runs the same stages over N processes
(`stages.PROCESSES` says how each uses them); rank 0 writes the markers, the log and the report.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import time
from importlib.metadata import version
from pathlib import Path

from .. import dist
from ..data import DataSource
from ..io import read_json, write_json
from .layout import RunLayout
from .presets import run_config
from .stages import PROCESSES, STAGES, RunContext

PACKAGES = ("torch", "transformers", "peft", "trl", "av", "faiss-cpu", "caredpo")


def peak_rss_mb() -> float:
    """Peak resident memory of this process and its finished children (Linux: ru_maxrss in KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024


class RunLog:
    """Timestamped lines to run.log and to the console (stderr)."""

    def __init__(self, path: Path):
        from ..progress import console

        self.path, self.console, self.t0 = path, console(), time.perf_counter()
        path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, message: str) -> None:
        if not dist.is_main():  # under torchrun rank 0 speaks, or a process running a stage alone
            return
        line = f"[{time.perf_counter() - self.t0:7.1f}s] {message}"
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
        self.console.print(line, highlight=False)


GENERATED_ONLY = ("data",)  # stages of a TwinClips run only: `--data DIR` reads a data set on disk


def stages_of(layout: RunLayout) -> dict:
    """The stages a run folder runs, in order: all of STAGES, or all but the generation stage."""
    return {k: v for k, v in STAGES.items() if layout.generated or k not in GENERATED_ONLY}


def run_pipeline(
    preset: str,
    seed: int,
    out: str | Path,
    only: list[str] | None = None,
    data: DataSource | None = None,
    skip_bad: bool = False,
) -> dict:
    """Run (or finish) the whole experiment in `out`, on TwinClips generated there or on the data
    set `data` (any layout `load_dataset` reads); returns results.json's content. skip_bad: list
    missing and unreadable videos (features/skipped.jsonl) and go on without them."""
    with dist.session(timeout_s=STAGE_TIMEOUT_S):
        return _run(preset, seed, out, only, data, skip_bad)


STAGE_TIMEOUT_S = 24 * 3600  # how long processes may wait at a barrier for rank 0's "main" stages


def _run(preset: str, seed: int, out, only, data: DataSource | None, skip_bad: bool) -> dict:
    config = run_config(preset, seed)
    layout = RunLayout.create(out, data.path if data else None)
    source = data or layout.data_source()
    if dist.is_main():
        _check_same_config(layout, config, data)
    dist.barrier()
    log = RunLog(layout.log)
    ctx = RunContext(layout=layout, config=config, source=source, log=log, skip_bad=skip_bad)
    procs = f"; {dist.world_size()} processes" if dist.world_size() > 1 else ""
    log(
        f"caredpo run: preset={preset} seed={seed} out={out} data={source.path}; precision: {_precisions(config)}{procs}"
    )
    names = stages_of(layout)
    stages = [(f"{i}/{len(names)}", n, fn) for i, (n, fn) in enumerate(names.items(), 1) if not only or n in only]
    for group in _groups(stages):
        _run_group(ctx, group)
    if not layout.marker("evaluate").exists():
        log("evaluation has not run yet (--only): no results table")
        return {}
    return _report(ctx) if dist.is_main() else {}


def _groups(stages: list) -> list[list]:
    """The stages in run order, consecutive "pair" stages (`PROCESSES`) in one group."""
    groups: list[list] = []
    for s in stages:
        paired = PROCESSES.get(s[1]) == "pair"
        if paired and groups and PROCESSES.get(groups[-1][0][1]) == "pair":
            groups[-1].append(s)
        else:
            groups.append([s])
    return groups


def _run_group(ctx: RunContext, group: list) -> None:
    """One stage as `PROCESSES` says, or a pair side by side (each process takes its share, alone).
    Every process leaves through the same barrier, so all see the markers written."""
    at, name, stage = group[0]
    how = PROCESSES.get(name)
    if how == "pair":
        for at, name, stage in dist.deal(group):
            with dist.alone():
                _run_stage(ctx, at, name, stage)
    elif how == "main":
        if dist.is_main():
            with _all_cores():
                _run_stage(ctx, at, name, stage)
    else:
        _run_stage(ctx, at, name, stage)
    dist.barrier()


@contextlib.contextmanager
def _all_cores():
    """Rank 0 of several processes (1 torch thread each under torchrun) takes every core while the
    others wait at a barrier; one process keeps the thread setting it was given."""
    import torch

    before = torch.get_num_threads()
    if dist.world_size() > 1:
        torch.set_num_threads(_cpus())
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _report(ctx: RunContext) -> dict:
    """results.json with the run's metadata, plots, captions.md, and the tables on the console."""
    from .report import left_out_note, plot_dpo_curves, plot_r1, print_factors, print_table, write_caption_examples

    layout, config = ctx.layout, ctx.config
    results = read_json(layout.results)
    results["meta"] = _metadata(layout, config)
    write_json(layout.results, results)
    plot_r1(results["arms"], layout.r1_plot)
    plot_dpo_curves(layout, layout.dpo_plot)
    write_caption_examples(layout, ctx.dataset, layout.caption_examples)
    name = "TwinClips" if layout.generated else str(layout.data)
    print_table(results["arms"], f"CaRe-DPO on {name} ({config.preset}, seed {config.seed}) — test split")
    print_factors(results.get("caption_factors", {}), "test captions stating each clip factor right (%)")
    note = left_out_note(ctx.dataset)
    if note:
        ctx.log(note)
    ctx.log(f"done: {layout.results}, plots and captions.md written")
    return results


def _run_stage(ctx: RunContext, at: str, name: str, stage) -> None:
    """at: "i/N", the stage's place in the run. Rank 0 (or a process running the stage alone)
    writes the marker."""
    marker = ctx.layout.marker(name)
    if marker.exists():
        ctx.log(f"stage {at} {name}: done earlier, skipped")
        return
    ctx.log(f"stage {at} {name}: start")
    t0 = time.perf_counter()
    info = stage(ctx)
    seconds = round(time.perf_counter() - t0, 1)
    if dist.is_main():
        where = {"process": dist.group_rank()} if dist.is_initialized() else {}  # under torchrun: who ran it
        write_json(marker, {"seconds": seconds, "peak_rss_mb": round(peak_rss_mb()), **where, **info})
    ctx.log(f"stage {at} {name}: finished in {seconds:.1f} s")


def _check_same_config(layout: RunLayout, config, data: DataSource | None) -> None:
    """A run folder belongs to one configuration and data set: resuming with another would mix
    results. run.json records them ("data": None for TwinClips generated in RUN/data)."""
    from ..records import DataError

    path = layout.run_json
    source = data.to_dict() if data else None
    if path.exists():
        old = read_json(path)
        if old.get("config") != _jsonable(config.to_dict()) or old.get("data") != source:
            raise DataError(
                f"{path}: this run folder was made with another preset/seed/config/data set; use a new --out folder"
            )
        return
    write_json(path, {"preset": config.preset, "seed": config.seed, "data": source, "config": config.to_dict()})


def _jsonable(obj):
    import json

    return json.loads(json.dumps(obj))


def _metadata(layout: RunLayout, config) -> dict:
    stages = {p.stem: read_json(p) for p in layout.markers()}
    return {
        "preset": config.preset,
        "seed": config.seed,
        "stage_seconds": {k: v["seconds"] for k, v in stages.items()},
        "total_stage_seconds": round(sum(v["seconds"] for v in stages.values()), 1),
        "precision": _precisions(config),
        "peak_rss_mb": max([round(peak_rss_mb())] + [v.get("peak_rss_mb", 0) for v in stages.values()]),
        "versions": {p: _version(p) for p in PACKAGES},
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {_cpus()} CPUs",
    }


def _precisions(config) -> dict[str, str]:
    """What each model's `precision` setting means on this machine ("fp32" or "bf16")."""
    from ..precision import resolve

    return {
        "captioner": resolve(config.captioner.precision),
        "retriever": resolve(config.retriever.model.precision, config.retriever.device),
    }


def _version(pkg: str) -> str:
    try:
        return version(pkg)
    except Exception:  # not installed: say so rather than fail the report
        return "not installed"


def _cpus() -> int:
    return len(os.sched_getaffinity(0))
