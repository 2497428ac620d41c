"""`caredpo dpo`: tune the SFT captioner on preference groups with DG-DPO (or plain DPO).

    caredpo dpo --groups runs/x/prefs.jsonl --captioner runs/x/sft --features runs/x/features \
        --out runs/x/dg-dpo [--mode dpo] [--beta 0.1 --lambda-video 1 --lambda-nll 0 --margin 0] [--resume]

The reference log-probs come from the preference file (computed by `caredpo prefs` with the same
SFT captioner), so only the policy is in memory. The tuned captioner is saved to OUT/model.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer


def register(root: typer.Typer) -> None:
    root.command("dpo", help="Tune the captioner with DG-DPO (our reconstruction) or plain DPO.")(dpo)


def dpo(
    groups: Path = typer.Option(..., "--groups", help="preference groups jsonl from `caredpo prefs`"),
    captioner: Path = typer.Option(..., "--captioner", help="SFT captioner folder: the policy's start"),
    features: Path = typer.Option(..., "--features", help="features folder (FeatureStore)"),
    out: Path = typer.Option(..., "--out", help="output folder (checkpoint, metrics.jsonl, model/)"),
    mode: str = typer.Option("dg-dpo", "--mode", help="dg-dpo | dpo (best-vs-worst pair, no video group)"),
    beta: float = typer.Option(0.1, "--beta", help="sigmoid inverse temperature"),
    lambda_video: Optional[float] = typer.Option(None, "--lambda-video", help="video-group weight (dg-dpo: 1)"),
    lambda_nll: float = typer.Option(0.0, "--lambda-nll", help="per-token NLL weight of the best caption"),
    margin: float = typer.Option(0.0, "--margin", help="reward gap a pair needs to count"),
    pairs: Optional[str] = typer.Option(None, "--pairs", help="all | best_worst (dg-dpo default: all)"),
    lr: float = typer.Option(5e-5, "--lr", help="AdamW learning rate"),
    epochs: int = typer.Option(1, "--epochs"),
    max_steps: int = typer.Option(0, "--max-steps", help="0: no limit"),
    groups_per_batch: int = typer.Option(1, "--groups-per-batch", help="twin groups per step"),
    checkpoint_every: int = typer.Option(50, "--checkpoint-every"),
    seed: int = typer.Option(0, "--seed"),
    resume: bool = typer.Option(False, "--resume", help="continue from OUT/checkpoint.pt"),
) -> None:
    from ..dpo.train import DPOConfig, NonFiniteLossError, train_dpo

    overrides = {k: v for k, v in {"lambda_video": lambda_video, "pairs": pairs}.items() if v is not None}
    cfg = DPOConfig.for_mode(mode, beta=beta, lambda_nll=lambda_nll, margin=margin, lr=lr, epochs=epochs,
                             max_steps=max_steps, groups_per_batch=groups_per_batch,
                             checkpoint_every=checkpoint_every, seed=seed, **overrides)
    policy = _load_captioner(captioner)
    if hasattr(policy, "set_trainable"):
        policy.set_trainable()  # projector + LoRA train, the base LM stays frozen
    feature_fn = _feature_fn(features)
    try:
        summary = train_dpo(policy, groups, feature_fn, out, cfg, resume=resume)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(1) from None
    if summary["finished"] and hasattr(policy, "save_pretrained"):
        policy.save_pretrained(out / "model")  # like SFT: from_pretrained(OUT) finds it
    print(f"{cfg.mode}: {summary['steps']}/{summary['total_steps']} steps; metrics {summary['metrics']}")


def _load_captioner(path: Path):
    from ..captioner.model import VideoCaptioner

    return VideoCaptioner.from_pretrained(path)


def _feature_fn(features_dir: Path):
    """The captioner's visual input: the 2x2 grid features of each video."""
    from ..features import FeatureStore

    return FeatureStore.load(features_dir).grid_feats
