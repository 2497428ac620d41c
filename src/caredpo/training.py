"""What the three trainers share (captioner SFT, retriever, DG-DPO): their files, the checkpoint
and its resume guard, the metrics log, the non-finite check and the learning-rate warm-up.

A trainer's output folder:

    train_config.json   its settings
    log.jsonl           one row a step (and evaluation rows), each with its "step"; NaN/inf as null
    checkpoint/         the latest resumable state (below)
    metrics.json        the run's final numbers
    model/              the trained model, in the model's own format

checkpoint/ holds weights.pt (the tensors the run changes), trainer.pt (optimizer, scheduler,
torch RNG), meta.json (what a resumed run must share with the one that wrote it: the resume
guard) and state.json ({"step"}). It is written whole beside the previous one and swapped in
(`folders.staged_dir`), so a kill leaves one or the other, never a torn one. Every trainer's data
order is a pure function of (seed, step), so these files resume a run exactly.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .folders import staged_dir
from .io import append_jsonl, atomic_write_text, read_json, read_jsonl, write_json
from .records import DataError, NonFiniteLossError

LOG_FILE = "log.jsonl"
CONFIG_FILE = "train_config.json"
SUMMARY_FILE = "metrics.json"
CHECKPOINT_DIR = "checkpoint"
_WEIGHTS, _TRAINER, _META, _STATE = "weights.pt", "trainer.pt", "meta.json", "state.json"


def plain(obj: Any) -> Any:
    """`obj` as read back from JSON (tuples become lists), so saved and current settings compare."""
    return json.loads(json.dumps(obj))


# ---------------------------------------------------------------- learning rate


def _constant(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up from 1/warmup_steps to 1, then constant."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0


def _cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


SCHEDULES: dict[str, Callable[[int, int, int], float]] = {"constant": _constant, "cosine": _cosine}


def lr_schedule(
    optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Each group's lr = its initial lr x SCHEDULES[name](step); call .step() after each update."""
    factor = SCHEDULES[name]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: factor(s, warmup_steps, total_steps))


def due(period: int, step: int) -> bool:
    """Whether an every-`period`-steps event (checkpoint, evaluation) falls on `step`; 0: never."""
    return bool(period) and step % period == 0


# ---------------------------------------------------------------- metrics log


class MetricsLog:
    """out_dir/log.jsonl: rows appended as the run goes; rows past a checkpoint are dropped on resume."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / LOG_FILE

    def append(self, row: Mapping[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        append_jsonl(self.path, [clean])

    def rows(self) -> list[dict]:
        return list(read_jsonl(self.path))

    def keep_until(self, step: int) -> None:
        """Keep rows up to `step` (a resumed run redoes the later ones; 0: a fresh, empty log)."""
        kept = [r for r in read_jsonl(self.path) if r["step"] <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))


# ---------------------------------------------------------------- checkpoint


def check_resume(saved: Mapping[str, Any], current: Mapping[str, Any], where: Path) -> None:
    """Refuse to resume when a setting of the guard differs (named in the error)."""
    old, new = _flat(saved), _flat(current)
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if changed:
        raise DataError(
            f"{where}: checkpoint was made with other settings ({', '.join(changed[:6])}); resume with "
            "the same settings, or start without --resume / with another --out"
        )


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, Mapping) else {f"{prefix}{k}": v})
    return out


class Checkpoint:
    """out_dir/checkpoint/: weights, optimizer, scheduler, RNG, step, and the resume guard."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / CHECKPOINT_DIR

    def _folder(self) -> Path | None:
        """The complete checkpoint: checkpoint/, or the newest staged copy when a kill hit the swap."""
        if (self.path / _STATE).exists():
            return self.path
        spare = [p for p in self.path.parent.glob(f".{self.path.name}.*") if (p / _STATE).exists()]
        return max(spare, key=lambda p: read_json(p / _STATE)["step"], default=None)

    def exists(self) -> bool:
        return self._folder() is not None

    def step(self) -> int | None:
        folder = self._folder()
        return None if folder is None else int(read_json(folder / _STATE)["step"])

    def save(
        self,
        step: int,
        meta: Mapping[str, Any],
        weights: Mapping[str, Tensor],
        optimizer: torch.optim.Optimizer,
        scheduler,
    ) -> None:
        with staged_dir(self.path) as tmp:
            torch.save(dict(weights), tmp / _WEIGHTS)
            torch.save(
                {
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                },
                tmp / _TRAINER,
            )
            write_json(tmp / _META, plain(dict(meta)))
            write_json(tmp / _STATE, {"step": step})

    def load(self, meta: Mapping[str, Any], optimizer: torch.optim.Optimizer, scheduler) -> tuple[int, dict]:
        """Check the guard, restore optimizer, scheduler and RNG: (step, weights)."""
        folder = self._folder()
        if folder is None:
            raise DataError(f"{self.path}: no checkpoint to resume from")
        check_resume(read_json(folder / _META), plain(dict(meta)), folder)
        state = torch.load(folder / _TRAINER, map_location="cpu", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        return int(read_json(folder / _STATE)["step"]), self.weights(folder)

    def weights(self, folder: Path | None = None) -> dict[str, Tensor]:
        return torch.load((folder or self._folder()) / _WEIGHTS, map_location="cpu", weights_only=False)

    def clear(self) -> None:
        for p in [self.path, *self.path.parent.glob(f".{self.path.name}.*")]:
            shutil.rmtree(p, ignore_errors=True)


def restore_weights(targets: Mapping[str, Tensor], weights: Mapping[str, Tensor], where: Path) -> None:
    """Copy saved tensors into the model's (same names, in place)."""
    if set(targets) != set(weights):
        odd = sorted(set(targets) ^ set(weights))
        raise DataError(f"{where}: the checkpoint's weights do not fit the model ({odd[:3]} ...)")
    with torch.no_grad():
        for name, t in targets.items():
            t.copy_(weights[name])


def begin(out_dir: str | Path, resume: bool, main: bool = True) -> int | None:
    """The checkpoint's step when resuming from one, else None (a fresh start). The writing
    process (`main`) then drops log rows past that step (they are redone), or, starting fresh,
    any old checkpoint and log."""
    checkpoint = Checkpoint(out_dir)
    step = checkpoint.step() if resume else None
    if main:
        if step is None:
            checkpoint.clear()
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        MetricsLog(out_dir).keep_until(step or 0)
    return step


# ---------------------------------------------------------------- non-finite check


def check_finite(
    value: Tensor | float,
    what: str,
    step: int,
    checkpoint: Checkpoint | None,
    trainer: str,
    hint: str,
    details: str = "",
) -> None:
    """Raise NonFiniteLossError (before the update) when `value` is NaN/inf, naming the last good
    checkpoint."""
    value = torch.as_tensor(value)
    if torch.isfinite(value).all():
        return
    last = checkpoint.step() if checkpoint is not None else None
    kept = (
        f"the last good checkpoint is {checkpoint.path} (step {last})"
        if last is not None
        else "no checkpoint was written yet"
    )
    details = f"; {details}" if details else ""
    raise NonFiniteLossError(
        f"{trainer} step {step}: non-finite {what} ({float(value.detach())}{details}); "
        f"stopped before the update; {kept}. {hint}"
    )


def clip_gradients(params: list[Tensor], grad_clip: float) -> Tensor:
    """Global gradient norm (before clipping); clipped to grad_clip when > 0."""
    return torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
