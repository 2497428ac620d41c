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
process weights its loss terms by its share of the videos in them (`batch.shared_loss`), gradients
are summed over processes, so the update equals one process's on the whole batch. Only rank 0 writes.

The run folder is a trainer's (`caredpo.training`): log.jsonl (one `stats.DPOStats` row a step, plus
step, grad_norm, lr, videos, time_s, epoch), checkpoint/, train_config.json, metrics.json.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .. import dist
from ..io import numbered_jsonl, read_jsonl, write_json
from ..records import (
    DataError,
    NonFiniteLossError,  # noqa: F401  (still importable from here, as before dpo/config.py)
    work_units,
)
from ..training import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    LOG_FILE,
    SUMMARY_FILE,
    Checkpoint,
    MetricsLog,
    begin,
    check_finite,
    clip_gradients,
    due,
    lr_schedule,
    restore_weights,
)
from .batch import FeatureFn, batch_loss, shared_loss
from .config import DPOConfig
from .stats import DPOStats, combine

CHECKPOINT = CHECKPOINT_DIR  # out_dir/CHECKPOINT exists once a run has saved (`resume=True` continues from it)
HINT = "Lower the learning rate or beta, or check the reference log-probs in the preference file."


# ---------------------------------------------------------------- preference groups

# the fields every row needs, and their JSON types (the format: this module's docstring)
GROUP_FIELDS = {"video_id": str, "captions": list, "rewards": list, "ref_logps": list, "best": int}


def load_groups(path: str | Path) -> list[dict]:
    """The rows of a groups.jsonl; a bad line raises `DataError` "FILE:LINE: video: reason"."""
    rows = []
    for n, row in numbered_jsonl(path, GROUP_FIELDS):
        problem = _row_problem(row)
        if problem:
            raise DataError(f"{path}:{n}: {row['video_id']}: {problem}")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no preference groups")
    return rows


def _row_problem(row: dict) -> str | None:
    if not all(isinstance(row.get(key, []), list) for key in ("negatives", "ref_cross_logps", "lengths")):
        return "negatives, ref_cross_logps and lengths must be lists"
    numbers = [*row["rewards"], *row["ref_logps"], *row.get("ref_cross_logps", [])]
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in numbers):
        return "rewards and reference log-probs must be numbers"
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
    return [sum(order[s : s + groups_per_batch], []) for s in range(0, len(order), groups_per_batch)]


# ---------------------------------------------------------------- the loop


@dataclass
class _Run:
    """Everything a step changes, so a checkpoint resumes bit-for-bit (on CPU)."""

    policy: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    checkpoint: Checkpoint
    step: int = 0

    def save(self, config: DPOConfig) -> None:
        weights = {n: p.detach() for n, p in _trainable(self.policy)}  # no copy: peak memory
        self.checkpoint.save(self.step, config.resume_guard(), weights, self.optimizer, self.scheduler)

    def load(self, config: DPOConfig) -> None:
        self.step, weights = self.checkpoint.load(config.resume_guard(), self.optimizer, self.scheduler)
        restore_weights(dict(_trainable(self.policy)), weights, self.checkpoint.path)


def _trainable(policy: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in policy.named_parameters() if p.requires_grad]


def _make_run(policy: nn.Module, config: DPOConfig, out: Path) -> _Run:
    params = [p for _, p in _trainable(policy)]
    if not params:
        raise ValueError("the policy has no trainable parameters (requires_grad=False everywhere)")
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return _Run(policy, opt, lr_schedule(opt, "constant", config.warmup_steps), Checkpoint(out))


def train_dpo(
    policy: nn.Module,
    groups: str | Path | Sequence[dict],
    features: FeatureFn,
    out_dir: str | Path,
    config: DPOConfig = DPOConfig(),
    *,
    resume: bool = False,
    stop_after: int | None = None,
    show_progress: bool = True,
) -> dict:
    """Train `policy` (any nn.Module with a differentiable `logprob(features, captions)`) in place.

    Writes `out_dir/log.jsonl` (one row a step: loss, reward accuracy, margin, ...), `checkpoint/`
    (every `save_every` steps and at the end: trainable weights, optimizer, scheduler, RNG, step;
    the data order follows from seed and step), `train_config.json` and `metrics.json`.
    `resume=True` continues from the checkpoint and ends with the same weights as an uninterrupted
    run. `stop_after=N` pauses after global step N (with a checkpoint). A NaN/inf loss or gradient
    raises NonFiniteLossError before the update; the last checkpoint is left as it was."""
    out = Path(out_dir)
    rows = load_groups(groups) if isinstance(groups, (str, Path)) else list(groups)
    _check_start(out, resume, config)
    torch.manual_seed(config.seed)
    run = _make_run(policy, config, out)
    if begin(out, resume, main=dist.is_main()) is not None:
        run.load(config)
    dist.broadcast_tensors(p for _, p in _trainable(policy))  # every process starts from rank 0's weights
    if dist.is_main():
        write_json(out / CONFIG_FILE, asdict(config))
    policy.train(config.dropout)
    per_epoch = len(twin_batches(rows, config.groups_per_batch, config.seed, 0))
    total = config.epochs * per_epoch
    total = min(total, config.max_steps) if config.max_steps else total
    end = min(total, stop_after) if stop_after is not None else total
    _loop(run, rows, features, config, per_epoch, total, end, show_progress)
    summary = {
        "steps": run.step,
        "total_steps": total,
        "finished": run.step >= total,
        "checkpoint": str(run.checkpoint.path),
        "metrics": str(out / LOG_FILE),
        "passes": pass_stats(metrics_rows(out)) if dist.is_main() else [],
    }
    if dist.is_main():
        write_json(out / SUMMARY_FILE, summary)
    return summary


def _check_start(out: Path, resume: bool, config: DPOConfig) -> None:
    if Checkpoint(out).exists() and not resume:
        raise DataError(f"{Checkpoint(out).path}: a checkpoint exists; pass --resume or use another output folder")
    if dist.world_size() > config.groups_per_batch:
        raise DataError(
            f"groups_per_batch={config.groups_per_batch} is below the {dist.world_size()} processes: "
            "each step's twin groups are split over them; raise --groups-per-batch"
        )


def _loop(
    run: _Run, rows, features, config: DPOConfig, per_epoch: int, total: int, end: int, show_progress: bool
) -> None:
    from rich.progress import TextColumn

    from ..progress import progress_bar

    stats_col = TextColumn("loss {task.fields[loss]:.4f} acc {task.fields[acc]:.2f} margin {task.fields[margin]:+.3f}")
    log = MetricsLog(run.checkpoint.path.parent)
    with progress_bar(stats_col, show=show_progress) as bar:
        task = bar.add_task(
            config.mode,
            total=total,
            completed=run.step,
            unit="steps",
            loss=float("nan"),
            acc=float("nan"),
            margin=float("nan"),
        )
        batches, epoch = None, -1
        while run.step < end:
            if run.step // per_epoch != epoch:
                epoch = run.step // per_epoch
                batches = twin_batches(rows, config.groups_per_batch, config.seed, epoch)
            stats, row = _step(run, [rows[i] for i in batches[run.step % per_epoch]], features, config)
            bar.update(task, advance=1, loss=stats.loss, acc=stats.reward_acc, margin=stats.margin)
            if not dist.is_main():  # rank 0 alone writes metrics and checkpoints
                continue
            log.append({**row, "epoch": epoch})
            if due(config.save_every, run.step) or run.step == end:
                run.save(config)


def _step(run: _Run, batch: Sequence[dict], features: FeatureFn, config: DPOConfig) -> tuple[DPOStats, dict]:
    """One update: (the batch's stats, its log row)."""
    t0 = time.perf_counter()
    run.optimizer.zero_grad(set_to_none=True)
    params = [p for _, p in _trainable(run.policy)]
    # more than one process: the whole batch's loss, the same on every process, so all stop together
    loss, stats = (batch_loss if dist.world_size() == 1 else shared_loss)(run.policy, batch, features, config)
    _check(stats.loss, "loss", run, stats, config)
    if loss.requires_grad:  # False only when no caption of the (local) batch is in any pair
        loss.backward()
    grad_norm = float("nan")
    if dist.all_reduce_grads(params, average=False):  # summed: each process's loss is its share
        grad_norm = clip_gradients(params, config.grad_clip)
        _check(grad_norm, "gradient norm", run, stats, config)
        grad_norm = float(grad_norm)
        run.optimizer.step()
    run.scheduler.step()
    run.step += 1
    return stats, {
        "step": run.step,
        **stats.to_row(),
        "grad_norm": grad_norm,
        "lr": run.optimizer.param_groups[0]["lr"],
        "videos": len(batch),
        "time_s": time.perf_counter() - t0,
    }


def _check(value, what: str, run: _Run, stats: DPOStats, config: DPOConfig) -> None:
    terms = ", ".join(f"{k}={v}" for k, v in stats.term_losses().items())
    check_finite(value, what, run.step + 1, run.checkpoint, config.mode, HINT, terms)


# ---------------------------------------------------------------- metrics log


def metrics_rows(out_dir: str | Path) -> list[dict]:
    """The metrics log of a run, one dict a step (NaN is written as null)."""
    return list(read_jsonl(Path(out_dir) / LOG_FILE))


def read_stats(out_dir: str | Path) -> list[tuple[int, DPOStats]]:
    """(step, stats) of every logged step of a run."""
    return [(row["step"], DPOStats.from_row(row)) for row in metrics_rows(out_dir)]


PASS_FIELDS = ("reward_acc", "margin", "video_acc", "video_margin", "loss_nll")


def pass_stats(rows: Sequence[dict]) -> list[dict]:
    """One entry per pass over the groups (the log rows' `epoch`): its steps and their stats combined.

    In the first pass every step meets twin groups the policy has not been trained on, so its
    reward_acc and video_acc are held-out numbers (progressive validation): how far the
    preferences learned so far carry to new groups. A later pass shows how well the seen ones fit."""
    out = []
    for epoch in sorted({row["epoch"] for row in rows}):
        steps = [DPOStats.from_row(row) for row in rows if row["epoch"] == epoch]
        pooled = combine(steps)
        out.append({"epoch": epoch, "steps": len(steps), **{k: _rounded(getattr(pooled, k)) for k in PASS_FIELDS}})
    return out


def _rounded(x: float | None) -> float | None:
    """4 decimals; None for a term that is off or a mean over nothing (NaN is not JSON)."""
    return None if x is None or not math.isfinite(x) else round(x, 4)
