"""SFT recipes side by side: what each buys in caption correctness, and what it costs.

    python benchmarks/sft_recipes.py --run runs/default-s0 [--variants base_100,default] [--device cuda]

Each variant fine-tunes a fresh SmolLM2 captioner (projector + LoRA on all layers) on the run's
training clips, writes greedy captions for its test clips and judges them with
`caredpo.captioner.factors`. The table gives val NLL, SFT seconds and the % of test captions that
state each factor right. `default` is the `default` preset's recipe (8 videos x 4 sentences a step,
150 steps); `base_100` the one before it (8 x 2, 100 steps). On 2 CPU cores a variant takes 6 to 15
minutes; on one H100 a 300-step variant takes about 3.5 minutes (launch-bound: run several at once).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

# name -> (steps, SFTConfig overrides, CaptionerConfig overrides)
VARIANTS: dict[str, tuple[int, dict, dict]] = {
    "base_100": (100, {}, {}),
    "default": (150, {"captions_per_video": 4}, {}),
    "cap4_100": (100, {"captions_per_video": 4}, {}),
    "all8_150": (150, {"videos_per_step": 4, "captions_per_video": 8}, {}),
    "base_300": (300, {}, {}),
    "projlr_100": (100, {"lr_projector": 1e-2}, {}),
    "nodelta_300": (300, {}, {"temporal_delta": False}),
}
BASE_SFT = dict(videos_per_step=8, captions_per_video=2, lr_projector=2e-3, lr_lora=1e-3, val_every=0,
                val_videos=16, save_every=0, seed=0)
FACTOR_COLUMNS = ("colour", "shape", "size", "background", "motion", "direction")


def run_variant(name: str, run: Path, device: str, out: Path, lm: str = "smollm2") -> dict:
    from caredpo.captioner.factors import factor_scores
    from caredpo.captioner.model import CaptionerConfig, VideoCaptioner
    from caredpo.captioner.sft import SFTConfig, train_sft
    from caredpo.data import load_dataset
    from caredpo.features import FeatureStore

    steps, sft_over, cap_over = VARIANTS[name]
    dataset, store = load_dataset(run / "data"), FeatureStore.load(run / "data" / "features")
    model = VideoCaptioner(CaptionerConfig(lm=lm, num_frames=8, lora_layers=-1, seed=0, **cap_over)).to(device)
    t0 = time.perf_counter()
    res = train_sft(model, dataset, store, out / name, SFTConfig(steps=steps, **{**BASE_SFT, **sft_over}),
                    show_progress=False, log=lambda s: None)
    seconds = time.perf_counter() - t0
    test = dataset.split("test")
    captions = []
    for i in range(0, len(test), 100):
        feats = store.grid_feats([v.id for v in test[i:i + 100]])
        captions += [c[0] for c in model.generate(feats, n=1, temperature=0.0, max_new_tokens=24, seed=0)]
    row = {"variant": name, "steps": steps, "val_nll": res["final_val_loss"], "sft_seconds": round(seconds, 1),
           "right": factor_scores((c, v.factors) for c, v in zip(captions, test)),
           "distinct_captions": len(set(captions)), "captions": dict(zip([v.id for v in test], captions))}
    (out / f"{name}.json").write_text(json.dumps(row, indent=1))
    return row


def print_table(rows: list[dict]) -> None:
    print(f"{'variant':14s} {'steps':>5s} {'val NLL':>7s} {'SFT s':>7s} " + " ".join(f"{c:>10s}" for c in FACTOR_COLUMNS))
    for r in rows:
        cells = " ".join(f"{r['right'].get(c, float('nan')):10.1f}" for c in FACTOR_COLUMNS)
        print(f"{r['variant']:14s} {r['steps']:5d} {r['val_nll']:7.3f} {r['sft_seconds']:7.1f} {cells}")
    print("(columns after SFT s: % of test captions stating the factor right; greedy, 24 new tokens)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, default=Path("runs/default-s0"), help="a finished run (its data/ is used)")
    ap.add_argument("--variants", default="base_100,default", help=f"comma list of {sorted(VARIANTS)}")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_sft_recipes"))
    ap.add_argument("--lm", default="smollm2", help="base LM: smollm2, tiny (a quick check) or a local folder")
    args = ap.parse_args(argv)
    names = args.variants.split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    print_table([run_variant(n, args.run, args.device, args.out, args.lm) for n in names])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
