"""Retriever recipes side by side: does the role retriever read what tells twins apart, and how far
does it trust a generated caption?

    python benchmarks/retriever_recipes.py --run runs/default-s0 [--variants default,uniform] [--device cuda]

Each variant (overrides of the `default` preset's `role` retriever config, or with --retriever NAME
of another of the run's retrievers, e.g. no_caption) trains a fresh one on the run's training clips,
with the run's greedy SFT captions of the training clips as the generated-caption pool
(captions/sft_train.jsonl), and is evaluated on the test
split three ways: with oracle captions (a specific reference sentence that is not the query), with
the run's SFT test captions (captions/sft_test.jsonl), and with no caption. What a variant costs:
docs/results.md, "Measurements behind the code".
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

# name -> RetrieverTrainConfig overrides on the default preset's role retriever ("model" overrides
# go to its RetrieverConfig)
VARIANTS: dict[str, dict] = {
    "default": {},  # specific queries and captions, 25% generated captions, whole encoder, 200 steps
    "uniform": {
        "query_sentences": "all",
        "caption_sentences": "all",
        "generated_caption_prob": None,
        "max_steps": 50,
        "model": {"train_layers": 2, "max_caption_tokens": 32},
    },  # the recipe before
    "top2": {"model": {"train_layers": 2}},
    "oracle_only": {"generated_caption_prob": 0.0},
    "gen50": {"generated_caption_prob": 0.5},
    "gen50_nocap20": {"generated_caption_prob": 0.5, "no_caption_prob": 0.2},
    "gen15": {"generated_caption_prob": 0.15},
    "steps100": {"max_steps": 100},  # the preset before (4 epochs of 800 clips)
    "steps300": {"max_steps": 300},
}


def variant_config(name: str, seed: int, device: str, retriever: str = "role"):
    from caredpo.pipeline.presets import run_config

    over = dict(VARIANTS[name])
    base = run_config("default", seed).retriever_config(retriever)
    model = replace(base.model, **over.pop("model", {}))
    return replace(base, model=model, device=device, **over)


def run_variant(name: str, run: Path, dataset, store, device: str, out: Path, retriever: str = "role") -> dict:
    from caredpo.captioner.generate import first_captions, load_captions
    from caredpo.pipeline.layout import RunLayout, TrainerFiles
    from caredpo.pipeline.report import run_seed
    from caredpo.retrieval.score import evaluate, reference_captions
    from caredpo.retrieval.train import train_retriever

    layout = RunLayout.load(run)
    seed = run_seed(layout)  # the variants train and draw oracle captions as the run's retriever did
    cfg = variant_config(name, seed, device, retriever)
    pool = load_captions(layout.captions("sft", "train"))
    t0 = time.perf_counter()
    model, _ = train_retriever(cfg, dataset, store, out / name, caption_pool=pool, progress=False, log=lambda s: None)
    seconds = time.perf_counter() - t0
    sft_test = layout.captions("sft", "test")  # absent until the run's test-caption stage: column left out
    arms = {"oracle": reference_captions(dataset, "test", seed=seed), "none": None}
    if sft_test.exists():
        arms["sft"] = first_captions(load_captions(sft_test))
    row = {
        "variant": name,
        "steps": json.loads(TrainerFiles(out / name).metrics.read_text())["step"],
        "seconds": round(seconds, 1),
    }
    for arm, caps in arms.items():
        m = evaluate(model.eval(), dataset, store, caps, "test")
        row[arm] = {"R1": m["t2v"]["R1"], "R5": m["t2v"]["R5"], "twin_acc": m["twin_acc"]}
    (out / f"{name}.json").write_text(json.dumps(row, indent=1))
    return row


def print_table(rows: list[dict]) -> None:
    arms = ("oracle", "sft", "none")
    print(
        f"{'variant':14s} {'steps':>5s} {'train s':>7s} "
        + " ".join(f"{a + ' R@1':>10s} {a + ' twin':>11s}" for a in arms)
    )
    for r in rows:
        cells = " ".join(
            f"{r[a]['R1']:10.1f} {r[a]['twin_acc']:11.1f}" if a in r else f"{'-':>10} {'-':>11}" for a in arms
        )
        print(f"{r['variant']:14s} {r['steps']:5d} {r['seconds']:7.1f} {cells}")
    print("(t2v R@1 and twin accuracy %, test split, with oracle / SFT / no auxiliary captions)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, default=Path("runs/default-s0"), help="a run with SFT train and test captions")
    ap.add_argument("--variants", default="default,uniform", help=f"comma list of {sorted(VARIANTS)}")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--retriever", default="role", help="which of the run's retrievers (RETRIEVERS) the variants retrain"
    )
    ap.add_argument("--out", type=Path, default=Path("runs/bench_retriever_recipes"))
    args = ap.parse_args(argv)
    names = args.variants.split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    from caredpo.data import load_dataset
    from caredpo.features import FeatureStore
    from caredpo.pipeline.layout import RunLayout

    layout = RunLayout.load(args.run)
    dataset, store = load_dataset(layout.data), FeatureStore.load(layout.features)
    out = args.out if args.retriever == "role" else args.out / args.retriever
    out.mkdir(parents=True, exist_ok=True)
    print_table([run_variant(n, args.run, dataset, store, args.device, out, args.retriever) for n in names])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
