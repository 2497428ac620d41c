"""The trainer toolkit (caredpo.training): checkpoint + resume guard, metrics log, schedules, NaN stop."""

from __future__ import annotations

import math
import os

import pytest
import torch

from caredpo.records import DataError, NonFiniteLossError
from caredpo.training import SCHEDULES, Checkpoint, MetricsLog, begin, check_finite, lr_schedule, restore_weights


def _model_and_opt(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    return model, opt, lr_schedule(opt, "constant", 4)


def _train(model, opt, sched, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(5, 3)).pow(2).sum().backward()
        opt.step()
        sched.step()


def test_checkpoint_resumes_exactly_and_guards_its_settings(tmp_path):
    model, opt, sched = _model_and_opt(0)
    _train(model, opt, sched, 2)
    Checkpoint(tmp_path).save(2, {"cfg": {"lr": 0.1, "sizes": (3, 2)}}, model.state_dict(), opt, sched)
    _train(model, opt, sched, 3)  # the straight run
    again, opt2, sched2 = _model_and_opt(1)
    step, weights = Checkpoint(tmp_path).load({"cfg": {"lr": 0.1, "sizes": [3, 2]}}, opt2, sched2)
    restore_weights(again.state_dict(), weights, tmp_path)
    _train(again, opt2, sched2, 3)
    assert step == 2 and all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    with pytest.raises(DataError, match=r"other settings \(cfg\.lr\)"):
        Checkpoint(tmp_path).load({"cfg": {"lr": 0.2, "sizes": [3, 2]}}, opt2, sched2)
    with pytest.raises(DataError, match="do not fit"):
        restore_weights({"other": torch.zeros(1)}, weights, tmp_path)


def test_a_kill_between_the_renames_of_the_swap_keeps_a_checkpoint(tmp_path):
    model, opt, sched = _model_and_opt(0)
    ckpt = Checkpoint(tmp_path)
    ckpt.save(1, {}, model.state_dict(), opt, sched)
    os.rename(ckpt.path, tmp_path / ".checkpoint.old-123")  # the old one moved aside, the new not yet in
    assert ckpt.exists() and ckpt.step() == 1
    assert begin(tmp_path, resume=True) == 1
    assert begin(tmp_path, resume=False) is None and not ckpt.exists()  # a fresh start clears it all


def test_metrics_log_writes_nan_as_null_and_drops_rows_past_the_checkpoint(tmp_path):
    log = MetricsLog(tmp_path)
    for step in (1, 2, 3):
        log.append({"step": step, "loss": float("nan") if step == 2 else 0.5})
    assert log.rows()[1]["loss"] is None
    log.keep_until(2)
    assert [r["step"] for r in log.rows()] == [1, 2]


def test_schedules_warm_up_then_hold_or_decay():
    constant, cosine = SCHEDULES["constant"], SCHEDULES["cosine"]
    assert [constant(s, 4, 0) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert constant(0, 0, 0) == 1.0
    assert cosine(1, 2, 12) == 1.0 and cosine(2, 2, 12) == 1.0
    assert cosine(12, 2, 12) == pytest.approx(0.1) and cosine(7, 2, 12) == pytest.approx(0.55)


def test_check_finite_names_the_step_and_the_last_checkpoint(tmp_path):
    check_finite(torch.tensor(1.0), "loss", 3, Checkpoint(tmp_path), "sft", "hint")
    with pytest.raises(NonFiniteLossError, match="sft step 3: non-finite loss .*no checkpoint was written yet. hint"):
        check_finite(torch.tensor(math.inf), "loss", 3, Checkpoint(tmp_path), "sft", "hint")
