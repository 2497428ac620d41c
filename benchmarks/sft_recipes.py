"""SFT recipes side by side: what each buys in caption correctness, and what it costs.

    python benchmarks/sft_recipes.py --run runs/default-s0 [--variants no_align,default] [--device cuda]

Each variant (overrides of the `default` preset's SFT and captioner configs) fine-tunes a fresh
captioner on the run's training clips, writes greedy captions for its test clips and judges them with
`caredpo.captioner.factors`. The table gives val NLL, SFT seconds and the % of test captions that
state each factor right. `default` is the `default` preset's recipe (1000 steps of projector
alignment, then 300 steps of 8 videos x 2 specific sentences); `no_align` leaves the alignment out. What a
variant costs on a CPU and on a GPU: docs/results.md, "Measurements behind the code".
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

# name -> (SFTConfig overrides, CaptionerConfig overrides) on the `default` preset's own configs
VARIANTS: dict[str, tuple[dict, dict]] = {
    "default": ({}, {}),  # colour histograms, 4 clip tokens, 1000 alignment steps, then 300 steps of 8 x 2 specific
    "all_sentences": ({"sentences": "all"}, {}),  # targets of every specificity, as before the fine-grained recipe
    "fp32": ({}, {"precision": "fp32"}),
    "no_align": ({"align_steps": 0}, {}),
    "align_250": ({"align_steps": 250}, {}),
    "cap4": ({"captions_per_video": 4}, {}),
    "steps_100": ({"steps": 100}, {}),
    "steps_150": ({"steps": 150}, {}),  # the preset before 300 steps
    "nodelta": ({}, {"temporal_delta": False}),
    "no_clip": ({}, {"clip_tokens": 0}),  # frame tokens only, as before the 4 clip tokens of `default`
}


def run_variant(name: str, dataset, store, device: str, out: Path, lm: str = "smollm2", seed: int = 0) -> dict:
    from caredpo.captioner.factors import factor_scores
    from caredpo.captioner.model import VideoCaptioner
    from caredpo.captioner.sft import train_sft
    from caredpo.pipeline.presets import run_config

    sft_over, cap_over = VARIANTS[name]
    preset = run_config("default", seed=seed)  # the run's seed: `default` is that run's own SFT
    sft = replace(preset.sft, val_every=0, save_every=0, **sft_over)  # val loss once, at the end
    model = VideoCaptioner(replace(preset.captioner, lm=lm, **cap_over)).to(device)
    t0 = time.perf_counter()
    res = train_sft(model, dataset, store, out / name, sft, show_progress=False, log=lambda s: None)
    seconds = time.perf_counter() - t0
    test = dataset.split("test")
    captions = []
    for i in range(0, len(test), 100):
        feats = store.grid_feats([v.id for v in test[i : i + 100]])
        captions += [
            c[0]
            for c in model.generate(
                feats, n=1, temperature=0.0, max_new_tokens=preset.test_captions.max_new_tokens, seed=seed
            )
        ]
    row = {
        "variant": name,
        "steps": sft.steps,
        "val_nll": res["final_val_loss"],
        "sft_seconds": round(seconds, 1),
        "right": factor_scores((c, v.factors) for c, v in zip(captions, test)),
        "distinct_captions": len(set(captions)),
        "captions": dict(zip([v.id for v in test], captions)),
    }
    (out / f"{name}.json").write_text(json.dumps(row, indent=1))
    return row


def print_table(rows: list[dict]) -> None:
    from caredpo.captioner.factors import FACTORS

    print(f"{'variant':14s} {'steps':>5s} {'val NLL':>7s} {'SFT s':>7s} " + " ".join(f"{c:>10s}" for c in FACTORS))
    for r in rows:
        cells = " ".join(f"{r['right'].get(c, float('nan')):10.1f}" for c in FACTORS)
        print(f"{r['variant']:14s} {r['steps']:5d} {r['val_nll']:7.3f} {r['sft_seconds']:7.1f} {cells}")
    print("(columns after SFT s: % of test captions stating the factor right; greedy, the preset's max_new_tokens)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, default=Path("runs/default-s0"), help="a finished run (its data/ is used)")
    ap.add_argument("--variants", default="no_align,default", help=f"comma list of {sorted(VARIANTS)}")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_sft_recipes"))
    ap.add_argument("--lm", default="smollm2", help="base LM: smollm2, tiny (a quick check) or a local folder")
    args = ap.parse_args(argv)
    names = args.variants.split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    from caredpo.data import load_dataset
    from caredpo.features import FeatureStore
    from caredpo.pipeline.layout import RunLayout
    from caredpo.pipeline.report import run_seed

    args.out.mkdir(parents=True, exist_ok=True)
    layout = RunLayout.load(args.run)
    dataset, store = load_dataset(layout.data), FeatureStore.load(layout.features)
    seed = run_seed(layout)
    print_table([run_variant(n, dataset, store, args.device, args.out, args.lm, seed) for n in names])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
