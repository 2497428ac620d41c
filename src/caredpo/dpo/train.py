"""The DG-DPO / plain-DPO trainer: policy only, reference log-probs read from the preference file.

Preference groups (one JSON object per line, written by `caredpo prefs`):

    {"video_id": "v0001", "group": "g017",          # twin group (null: the video is its own group)
     "captions": [K strings], "rewards": [K floats], # sampled captions and their retrieval rewards
     "ref_logps": [K floats],                        # log pi_ref(caption_k | video), summed over tokens
     "best": 2,                                      # index of c* (a caption with the top reward)
     "negatives": ["v0002", ...],                    # M hard-negative videos (its twins)
     "ref_cross_logps": [M floats],                  # log pi_ref(captions[best] | negative_j)
     "lengths": [K ints]}                            # optional: caption token counts (lambda_nll > 0)

K and M may differ between rows (padded and masked in the loss). No reference model is held in
memory. A batch holds whole twin groups, so both directions of the video group are seen.
`features(ids) -> Tensor[B, ...]` gives the policy's visual input (e.g. `FeatureStore.grid_feats`).

Under `torchrun` (see `caredpo.dist`) each step's twin groups are split over the processes; each
process weights its loss terms by its share of the videos in them (`term_weights`), gradients are
summed over processes, so the update equals one process's on the whole batch. Only rank 0 writes.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from .. import dist
from ..io import append_jsonl, atomic_write_text, read_jsonl, write_json
from ..records import DataError, NonFiniteLossError, work_units
from .batch import FeatureFn, batch_loss, shared_loss
from .loss import PAIR_MODES

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"

# mode -> the fields it fixes. "dpo" is the plain-DPO baseline arm: best-vs-worst pair, no video group.
MODES = {"dg-dpo": {}, "dpo": {"lambda_video": 0.0, "pairs": "best_worst"}}
# fields that change the maths: a resumed run must keep them
_RESUME_FIXED = ("mode", "beta", "lambda_video", "lambda_nll", "margin", "pairs", "lr", "weight_decay",
                 "warmup_steps", "groups_per_batch", "max_grad_norm", "seed", "dropout")


@dataclass(frozen=True)
class DPOConfig:
    """DG-DPO training settings (our reconstruction of the loss; see caredpo.dpo.loss)."""

    mode: str = "dg-dpo"  # "dg-dpo" | "dpo" (plain DPO: lambda_video 0, best-vs-worst); see for_mode()
    beta: float = 0.1  # inverse temperature of the sigmoid on log-ratio differences (> 0)
    lambda_video: float = 1.0  # weight of the video group (best caption: own video vs twins); >= 0
    lambda_nll: float = 0.0  # weight of the per-token NLL of the best caption (anchors fluency); >= 0
    margin: float = 0.0  # a pair (w, l) enters the caption group only if r_w - r_l > margin; >= 0
    pairs: str = "all"  # "all" pairs within a video's K captions, or "best_worst" only
    lr: float = 5e-5  # AdamW learning rate of the trainable parameters
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 0  # linear warm-up of the learning rate from 0, then constant
    epochs: int = 1  # passes over the preference groups
    max_steps: int = 0  # stop after this many optimizer steps (0: no limit)
    groups_per_batch: int = 1  # twin groups per optimizer step (all videos of a group together)
    max_grad_norm: float = 1.0  # gradient clipping by global norm (0: off)
    seed: int = 0  # data order and dropout RNG
    checkpoint_every: int = 50  # steps between checkpoints (a checkpoint is also written at the end)
    dropout: bool = False  # False: policy in eval mode (no dropout), so h(v, c) = 0 at step 0

    def __post_init__(self) -> None:
        checks = {
            "mode": (self.mode in MODES, f"one of {sorted(MODES)}"),
            "pairs": (self.pairs in PAIR_MODES, f"one of {PAIR_MODES}"),
            "beta": (self.beta > 0, "> 0"), "lr": (self.lr > 0, "> 0"),
            "lambda_video": (self.lambda_video >= 0, ">= 0"), "lambda_nll": (self.lambda_nll >= 0, ">= 0"),
            "margin": (self.margin >= 0, ">= 0"), "weight_decay": (self.weight_decay >= 0, ">= 0"),
            "warmup_steps": (self.warmup_steps >= 0, ">= 0"), "epochs": (self.epochs >= 1, ">= 1"),
            "max_steps": (self.max_steps >= 0, ">= 0"), "groups_per_batch": (self.groups_per_batch >= 1, ">= 1"),
            "max_grad_norm": (self.max_grad_norm >= 0, ">= 0"),
            "checkpoint_every": (self.checkpoint_every >= 1, ">= 1"),
        }
        for name, (ok, want) in checks.items():
            if not ok:
                raise ValueError(f"DPOConfig.{name} must be {want}, got {getattr(self, name)!r}")
        for name, value in MODES[self.mode].items():
            if getattr(self, name) != value:
                raise ValueError(f"DPOConfig(mode={self.mode!r}) needs {name}={value!r}, got "
                                 f"{getattr(self, name)!r}; use DPOConfig.for_mode({self.mode!r}, ...)")

    @classmethod
    def for_mode(cls, mode: str, **overrides) -> "DPOConfig":
        if mode not in MODES:
            raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
        return cls(mode=mode, **{**MODES[mode], **overrides})


# ---------------------------------------------------------------- preference groups

def load_groups(path: str | Path) -> list[dict]:
    rows = list(read_jsonl(path))
    if not rows:
        raise DataError(f"{path}: no preference groups")
    for i, row in enumerate(rows, 1):
        problem = _row_problem(row)
        if problem:
            raise DataError(f"{path}: line {i} ({row.get('video_id', '?')}): {problem}")
    return rows


def _row_problem(row: dict) -> str | None:
    for key in ("video_id", "captions", "rewards", "ref_logps", "best"):
        if key not in row:
            return f"missing field {key!r}"
    k, m = len(row["captions"]), len(row.get("negatives", []))
    if k < 1 or len(row["rewards"]) != k or len(row["ref_logps"]) != k:
        return "captions, rewards and ref_logps must have the same length >= 1"
    if len(row.get("ref_cross_logps", [])) != m:
        return "negatives and ref_cross_logps must have the same length"
    if "lengths" in row and len(row["lengths"]) != k:
        return "lengths must have one entry per caption"
    if not 0 <= row["best"] < k or row["rewards"][row["best"]] < max(row["rewards"]):
        return f"best={row['best']} is not an index of a top-reward caption"
    if not all(map(math.isfinite, [*row["rewards"], *row["ref_logps"], *row.get("ref_cross_logps", [])])):
        return "rewards and reference log-probs must be finite"
    return None


def twin_batches(rows: Sequence[dict], groups_per_batch: int, seed: int, epoch: int) -> list[list[int]]:
    """Row indices per step: groups in a seeded order (per epoch), whole groups per batch."""
    order = work_units(range(len(rows)), lambda i: rows[i].get("group"))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return [sum(order[s:s + groups_per_batch], []) for s in range(0, len(order), groups_per_batch)]


# ---------------------------------------------------------------- the loop

@dataclass
class _State:
    """Everything a step changes, so a checkpoint resumes bit-for-bit (on CPU)."""

    policy: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    step: int = 0

    def save(self, path: Path, config: DPOConfig) -> None:
        state = {"step": self.step, "config": dataclasses.asdict(config),
                 "trainable": {n: p.detach() for n, p in _trainable(self.policy)},  # no copy: peak memory
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "rng": torch.get_rng_state()}
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(state, tmp)
        tmp.replace(path)  # atomic: the previous (good) checkpoint survives a crash mid-write

    def load(self, path: Path, config: DPOConfig) -> None:
        state = torch.load(path, map_location="cpu", weights_only=False)
        changed = [k for k in _RESUME_FIXED if state["config"].get(k) != getattr(config, k)]
        if changed:
            raise DataError(f"{path}: written with other settings ({', '.join(changed)}); resume with the "
                            "same settings or start a new output folder")
        params = dict(_trainable(self.policy))
        if set(params) != set(state["trainable"]):
            raise DataError(f"{path}: trainable parameters differ from the policy's")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state["trainable"][n])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        self.step = state["step"]


def _trainable(policy: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in policy.named_parameters() if p.requires_grad]


def _make_state(policy: nn.Module, config: DPOConfig) -> _State:
    params = [p for _, p in _trainable(policy)]
    if not params:
        raise ValueError("the policy has no trainable parameters (requires_grad=False everywhere)")
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warm = config.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    return _State(policy, opt, sched)


def train_dpo(policy: nn.Module, groups: str | Path | Sequence[dict], features: FeatureFn,
              out_dir: str | Path, config: DPOConfig = DPOConfig(), *, resume: bool = False,
              stop_after: int | None = None, show_progress: bool = True) -> dict:
    """Train `policy` (any nn.Module with a differentiable `logprob(features, captions)`) in place.

    Writes `out_dir/metrics.jsonl` (one row a step: loss, reward accuracy, margin, ...),
    `checkpoint.pt` (every `checkpoint_every` steps and at the end: trainable weights, optimizer,
    scheduler, RNG, step; the data order follows from seed and step) and `dpo_config.json`.
    `resume=True` continues from the checkpoint and ends with the same weights as an uninterrupted
    run. `stop_after=N` pauses after global step N (with a checkpoint). A NaN/inf loss or gradient
    raises NonFiniteLossError before the update; the last checkpoint is left as it was."""
    out = Path(out_dir)
    rows = load_groups(groups) if isinstance(groups, (str, Path)) else list(groups)
    ckpt = out / CHECKPOINT
    if ckpt.exists() and not resume:
        raise DataError(f"{ckpt}: a checkpoint exists; pass --resume or use another output folder")
    if dist.world_size() > config.groups_per_batch:
        raise DataError(f"groups_per_batch={config.groups_per_batch} is below the {dist.world_size()} processes: "
                        "each step's twin groups are split over them; raise --groups-per-batch")
    torch.manual_seed(config.seed)
    state = _make_state(policy, config)
    if resume and ckpt.exists():
        state.load(ckpt, config)
    dist.broadcast_tensors(p for _, p in _trainable(policy))  # every process starts from rank 0's weights
    out.mkdir(parents=True, exist_ok=True)
    if dist.is_main():
        _trim_metrics(out, state.step)
        write_json(out / "dpo_config.json", dataclasses.asdict(config))
    policy.train(config.dropout)
    per_epoch = len(twin_batches(rows, config.groups_per_batch, config.seed, 0))
    total = config.epochs * per_epoch
    total = min(total, config.max_steps) if config.max_steps else total
    end = min(total, stop_after) if stop_after is not None else total
    _run(state, rows, features, out, config, per_epoch, total, end, show_progress)
    return {"steps": state.step, "total_steps": total, "finished": state.step >= total,
            "checkpoint": str(ckpt), "metrics": str(out / METRICS)}


def _run(state: _State, rows, features, out: Path, config: DPOConfig, per_epoch: int,
         total: int, end: int, show_progress: bool) -> None:
    from rich.progress import TextColumn

    from ..progress import progress_bar

    stats_col = TextColumn("loss {task.fields[loss]:.4f} acc {task.fields[acc]:.2f} "
                           "margin {task.fields[margin]:+.3f}")
    with progress_bar(stats_col, transient=not show_progress) as bar:
        task = bar.add_task(config.mode, total=total, completed=state.step, unit="steps",
                            loss=float("nan"), acc=float("nan"), margin=float("nan"))
        batches, epoch = None, -1
        while state.step < end:
            if state.step // per_epoch != epoch:
                epoch = state.step // per_epoch
                batches = twin_batches(rows, config.groups_per_batch, config.seed, epoch)
            batch = [rows[i] for i in batches[state.step % per_epoch]]
            stats = _step(state, batch, features, out, config)
            stats["epoch"] = epoch
            bar.update(task, advance=1, loss=stats["loss"], acc=stats["reward_acc"], margin=stats["margin"])
            if not dist.is_main():  # rank 0 alone writes metrics and checkpoints
                continue
            _log_metrics(out, stats)
            if state.step % config.checkpoint_every == 0 or state.step == end:
                state.save(out / CHECKPOINT, config)


def _step(state: _State, batch: Sequence[dict], features: FeatureFn, out: Path, config: DPOConfig) -> dict:
    t0 = time.perf_counter()
    state.optimizer.zero_grad(set_to_none=True)
    params = [p for _, p in _trainable(state.policy)]
    if dist.world_size() == 1:
        loss, stats = batch_loss(state.policy, batch, features, config)
        _check_finite(loss, "loss", state.step + 1, stats, out)
    else:  # the whole batch's loss, the same on every process: all stop together
        loss, stats = shared_loss(state.policy, batch, features, config)
        _check_finite(torch.tensor(stats["loss"]), "loss", state.step + 1, stats, out)
    if loss.requires_grad:  # False only when no caption of the (local) batch is in any pair
        loss.backward()
    grad_norm = float("nan")
    if dist.all_reduce_grads(params, average=False):  # summed: each process's loss is its share
        clip = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
        _check_finite(grad_norm, "gradient norm", state.step + 1, stats, out)
        grad_norm = float(grad_norm)
        state.optimizer.step()
    state.scheduler.step()
    state.step += 1
    return {"step": state.step, **stats, "grad_norm": grad_norm,
            "lr": state.optimizer.param_groups[0]["lr"], "videos": len(batch),
            "time_s": time.perf_counter() - t0}


def _check_finite(value: Tensor, what: str, step: int, stats: dict, out: Path) -> None:
    if torch.isfinite(value).all():
        return
    ckpt = out / CHECKPOINT
    kept = (f"the last good checkpoint is {ckpt} (step {torch.load(ckpt, weights_only=False)['step']})"
            if ckpt.exists() else "no checkpoint was written yet")
    parts = ", ".join(f"{k}={stats.get(k)}" for k in ("loss_caption", "loss_video", "loss_nll") if k in stats)
    raise NonFiniteLossError(f"step {step}: non-finite {what} ({float(value.detach())}; {parts}); stopped before the "
                             f"update; {kept}. Lower the learning rate or beta, or check the reference "
                             "log-probs in the preference file.")


# ---------------------------------------------------------------- metrics log

def metrics_rows(out_dir: str | Path) -> list[dict]:
    """The metrics log of a run, one dict a step (NaN is written as null)."""
    return list(read_jsonl(Path(out_dir) / METRICS))


def _log_metrics(out_dir: Path, row: dict) -> None:
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
    append_jsonl(out_dir / METRICS, [clean])


def _trim_metrics(out_dir: Path, last_step: int) -> None:
    """Keep rows up to the checkpoint: later ones are redone on resume (and a fresh run starts empty)."""
    kept = [r for r in read_jsonl(out_dir / METRICS) if r["step"] <= last_step]
    atomic_write_text(out_dir / METRICS, "".join(json.dumps(r) + "\n" for r in kept))
