"""`caredpo dpo`: tune the SFT captioner on preference groups with DG-DPO (or plain DPO).

    caredpo dpo --preset default --groups RUN/prefs/groups.jsonl --captioner RUN/captioner/sft/model \
        --features RUN/data/features --out RUN/captioner/dg_dpo [--mode dpo] [--beta 0.1 ...] [--resume]
    caredpo dpo --captioner hf --model-path /models/Qwen2-VL-2B-Instruct --data D --groups ... --out ...
    torchrun --nproc_per_node=2 --no-python caredpo dpo ... --groups-per-batch 2   # data-parallel, same result

--mode picks the preset's arm (dg-dpo: `RunConfig.dg_dpo`, dpo: `RunConfig.dpo`); the other options
replace its fields. The reference log-probs come from the preference file (computed by `caredpo
prefs` with the same SFT captioner), so only the policy is in memory. The tuned captioner is saved
to OUT/model when training finished.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from ..dpo.config import DPOConfig
from .common import PRESET, SEED, preset_config
from .flags import NO_OVERRIDES, Overrides, config_flags

# --mode -> the preset's config of that arm
MODE_ARMS = {"dg-dpo": "dg_dpo", "dpo": "dpo"}


def register(root: typer.Typer) -> None:
    root.command("dpo", help="Tune the captioner with DG-DPO (our reconstruction) or plain DPO.")(dpo)


@config_flags(exclude=("dpo.mode",), dpo=DPOConfig)
def dpo(
    groups: Path = typer.Option(..., "--groups", help="preference groups jsonl from `caredpo prefs`"),
    captioner: Path = typer.Option(
        ...,
        "--captioner",
        help="SFT captioner folder: the policy's start; "
        "or `hf` for a Hugging Face video MLLM (with --model-path and --data)",
    ),
    features: Path | None = typer.Option(
        None, "--features", help="features folder (FeatureStore); not with --captioner hf"
    ),
    model_path: Path | None = typer.Option(None, "--model-path", help="--captioner hf: local HF model folder"),
    data: Path | None = typer.Option(None, "--data", help="--captioner hf: data folder (videos are decoded)"),
    out: Path = typer.Option(..., "--out", help="output folder (checkpoint/, log.jsonl, model/)"),
    mode: str = typer.Option("dg-dpo", "--mode", help="dg-dpo | dpo (best-vs-worst pair, no video group)"),
    resume: bool = typer.Option(False, "--resume", help="continue from OUT/checkpoint/"),
    preset: str = PRESET,
    seed: int = SEED,
    overrides: Overrides = NO_OVERRIDES,
) -> None:
    from .. import dist
    from ..pipeline.stages import tune_captioner
    from ..records import DataError, NonFiniteLossError
    from .common import load_captioner

    if mode not in MODE_ARMS:
        raise DataError(f"--mode {mode!r}: choose one of {sorted(MODE_ARMS)}")
    cfg = overrides.apply("dpo", getattr(preset_config(preset, seed), MODE_ARMS[mode]))
    policy = load_captioner(captioner, model_path)
    feature_fn = _feature_fn(policy, features, data)
    with dist.session():  # under torchrun: data-parallel, rank 0 writes
        try:
            summary = tune_captioner(policy, groups, feature_fn, out, cfg, resume=resume)
        except NonFiniteLossError as e:
            print(f"error: {e}", file=sys.stderr)
            raise typer.Exit(1) from None
        main = dist.is_main()
    if main:
        print(f"{cfg.mode}: {summary['steps']}/{summary['total_steps']} steps; metrics {summary['metrics']}")
        for p in summary["passes"]:  # the first pass's groups are new to the policy: held-out accuracies
            seen = "new" if p["epoch"] == 0 else "seen"
            print(
                f"  pass {p['epoch'] + 1} ({p['steps']} steps, groups {seen}): caption pairs ordered right "
                f"{p['reward_acc']}, video group {p['video_acc']}"
            )


def _feature_fn(policy, features_dir: Path | None, data: Path | None):
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
