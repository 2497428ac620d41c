"""The preference stage on a run's first clips: twin groups batched per generate call vs one a call.

    python benchmarks/prefs_speed.py --run runs/default-s0 [--clips 32] [--units 1,4] [--threads 2]

Each row runs `build_preferences` (the run's SFT captioner, role retriever and greedy train
captions, the preset's PrefsConfig with `max_videos=--clips`) with `units_per_call` U into a fresh
folder, and reports its wall seconds, seconds a clip, the share of time in sampling / rewards /
reference log-probs, the sampling phase's GFLOP/s (2 x LM params x tokens, prefill included, + the
LM head at the sampled tokens) as a share of the bf16 or fp32 matmul peak measured at the start at
the same threads (benchmarks/peak.py), and how many of its rows equal the first row's (batching
keeps each group's uniforms; bf16 GEMMs may round differently at another batch size).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from captioner_speed import param_counts
from peak import describe, measure_peaks, share


@contextmanager
def timing(obj, method: str, seconds: dict[str, float], key: str):
    """Add the wall seconds of obj.method's calls to seconds[key] while inside."""
    fn = getattr(obj, method)
    seconds.setdefault(key, 0.0)

    def timed(*args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        seconds[key] += time.perf_counter() - t
        return out

    setattr(obj, method, timed)
    try:
        yield
    finally:
        delattr(obj, method)  # the class's method again


def load_parts(run: Path):
    """(dataset, store, SFT captioner, retriever reward, greedy train captions, seed) of a run."""
    from caredpo.captioner.generate import first_captions, load_captions
    from caredpo.captioner.model import VideoCaptioner
    from caredpo.data import load_dataset
    from caredpo.dpo.prefs import RetrieverReward
    from caredpo.features import FeatureStore
    from caredpo.pipeline.layout import RunLayout
    from caredpo.pipeline.report import run_seed
    from caredpo.retrieval.model import Retriever
    from caredpo.retrieval.score import Scorer

    layout = RunLayout.load(run)
    dataset, store = load_dataset(layout.data), FeatureStore.load(layout.features)
    captioner = VideoCaptioner.from_pretrained(layout.captioner_model("sft")).eval()
    reward = RetrieverReward(Scorer(Retriever.from_pretrained(layout.retriever_model("role")).eval()), store)
    greedy = first_captions(load_captions(layout.captions("sft", "train")))
    return dataset, store, captioner, reward, greedy, run_seed(layout)


def sampled_gflop(captioner, rows: list[dict]) -> float:
    """GFLOP of sampling these rows' captions: a prefill per clip + one LM step per caption token."""
    lm, head = param_counts(captioner)
    prefix = captioner.head_ids.numel() + captioner.config.num_visual_tokens + captioner.tail_ids.numel()
    tokens = sum(sum(r["lengths"]) for r in rows)
    return (2 * lm * (prefix * len(rows) + tokens) + 2 * head * tokens) / 1e9


def run_row(parts, units: int, clips: int, out: Path) -> tuple[dict, list[str]]:
    from caredpo.dpo.prefs import build_preferences
    from caredpo.pipeline.presets import run_config

    dataset, store, captioner, reward, greedy, seed = parts
    config = replace(run_config("default", seed).prefs, max_videos=clips, units_per_call=units)
    folder, seconds = out / f"units{units}", {}
    shutil.rmtree(folder, ignore_errors=True)
    with (
        timing(captioner, "generate", seconds, "sample"),
        timing(captioner, "logprob", seconds, "logprob"),
        timing(reward, "logits", seconds, "reward"),
    ):
        t = time.perf_counter()
        path = build_preferences(captioner, reward, dataset, store, folder, greedy, config, show_progress=False)
        wall = time.perf_counter() - t
    lines = path.read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    row = {"units": units, "clips": len(rows), "s": wall, "gflop": sampled_gflop(captioner, rows), **seconds}
    return row, lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, default=Path("runs/default-s0"), help="a run past its retriever stage")
    ap.add_argument("--clips", type=int, default=32, help="the first N training clips (whole twin groups)")
    ap.add_argument("--units", default="1,4", help="units_per_call values, the first is the reference")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", type=Path, default=Path("runs/bench_prefs_speed"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    peaks = measure_peaks()
    print(describe(peaks))
    parts = load_parts(args.run)
    from caredpo.precision import resolve

    prec = resolve(parts[2].config.precision)
    results = [run_row(parts, int(u), args.clips, args.out) for u in args.units.split(",")]
    ref, base = results[0][1], results[0][0]["s"]
    print(
        f"{'units/call':>10} {'clips':>5} {'wall s':>7} {'s/clip':>6} {'sample':>7} {'reward':>7} "
        f"{'logprob':>7} {'sample GFLOP/s':>14} {'of peak':>7} {'speed-up':>8} {'rows = first':>12}"
    )
    for row, lines in results:
        same = sum(a == b for a, b in zip(lines, ref))
        print(
            f"{row['units']:>10} {row['clips']:>5} {row['s']:7.1f} {row['s'] / row['clips']:6.2f} "
            f"{row['sample'] / row['s']:7.0%} {row['reward'] / row['s']:7.0%} {row['logprob'] / row['s']:7.0%} "
            f"{row['gflop'] / row['sample']:14.1f} {share(row['gflop'] / row['sample'], prec, peaks):7.0%} "
            f"{base / row['s']:7.2f}x {same:>5} of {len(ref)}"
        )
    print(f"(one run each, {args.threads} thread(s), precision {prec}; sample / reward / logprob: share of wall)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
