"""`caredpo dpo`: tune the SFT captioner on preference groups with DG-DPO (or plain DPO).

    caredpo dpo --groups runs/x/prefs.jsonl --captioner runs/x/sft --features runs/x/features \
        --out runs/x/dg-dpo [--mode dpo] [--beta 0.1 --lambda-video 1 --lambda-nll 0 --margin 0] [--resume]
    caredpo dpo --captioner hf --model-path /models/Qwen2-VL-2B-Instruct --data D --groups ... --out ...
    torchrun --nproc_per_node=2 --no-python caredpo dpo ... --groups-per-batch 2   # data-parallel, same result

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
    captioner: Path = typer.Option(..., "--captioner", help="SFT captioner folder: the policy's start; "
                                   "or `hf` for a Hugging Face video MLLM (with --model-path and --data)"),
    features: Optional[Path] = typer.Option(None, "--features", help="features folder (FeatureStore); "
                                            "not with --captioner hf"),
    model_path: Optional[Path] = typer.Option(None, "--model-path", help="--captioner hf: local HF model folder"),
    data: Optional[Path] = typer.Option(None, "--data", help="--captioner hf: data folder (videos are decoded)"),
    out: Path = typer.Option(..., "--out", help="output folder (checkpoint/, log.jsonl, model/)"),
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
    save_every: int = typer.Option(50, "--save-every", help="steps between checkpoints (0: only at the end)"),
    seed: int = typer.Option(0, "--seed"),
    resume: bool = typer.Option(False, "--resume", help="continue from OUT/checkpoint/"),
) -> None:
    from .. import dist
    from ..dpo.config import DPOConfig
    from ..dpo.train import train_dpo
    from ..records import NonFiniteLossError
    from .common import load_captioner

    overrides = {k: v for k, v in {"lambda_video": lambda_video, "pairs": pairs}.items() if v is not None}
    cfg = DPOConfig.for_mode(mode, beta=beta, lambda_nll=lambda_nll, margin=margin, lr=lr, epochs=epochs,
                             max_steps=max_steps, groups_per_batch=groups_per_batch,
                             save_every=save_every, seed=seed, **overrides)
    policy = load_captioner(captioner, model_path)
    if hasattr(policy, "set_trainable"):
        policy.set_trainable()  # projector + LoRA train, the base LM stays frozen
    feature_fn = _feature_fn(policy, features, data)
    with dist.session():  # under torchrun: data-parallel, rank 0 writes
        try:
            summary = train_dpo(policy, groups, feature_fn, out, cfg, resume=resume)
        except NonFiniteLossError as e:
            print(f"error: {e}", file=sys.stderr)
            raise typer.Exit(1) from None
        main = dist.is_main()
        if main and summary["finished"] and hasattr(policy, "save_pretrained"):
            policy.save_pretrained(out / "model")  # like SFT: from_pretrained(OUT) finds it
    if main:
        print(f"{cfg.mode}: {summary['steps']}/{summary['total_steps']} steps; metrics {summary['metrics']}")


def _feature_fn(policy, features_dir: Optional[Path], data: Optional[Path]):
    """The captioner's visual input: decoded frames for an HF MLLM (--data), else the 2x2 grid
    features of each video (--features)."""
    if hasattr(policy, "frames"):
        if data is None:
            raise typer.BadParameter("--captioner hf needs --data (the videos are decoded for the model)")
        from ..data import load_dataset

        return policy.frames(load_dataset(data))
    if features_dir is None:
        raise typer.BadParameter("--features is required (the captioner reads cached grid features)")
    from ..features import FeatureStore

    return FeatureStore.load(features_dir).grid_feats
