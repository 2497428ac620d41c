"""DG-DPO trainer on a tiny captioner stand-in: first-step loss, frozen parts, resume, NaN stop."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from caredpo.dpo.batch import batch_loss
from caredpo.dpo.config import DPOConfig
from caredpo.dpo.train import CHECKPOINT, load_groups, metrics_rows, train_dpo, twin_batches
from caredpo.records import DataError, NonFiniteLossError
from caredpo.training import Checkpoint

T, D = 4, 8  # frames, feature size of the fake visual features


class TinyPolicy(nn.Module):
    """Linear projector -> visual prefix -> tiny Llama; summed caption log-probs (Captioner.logprob).
    The token embedding (tied with the LM head) is frozen, to check that it never moves."""

    def __init__(self, tok, seed: int = 0):
        super().__init__()
        from caredpo.captioner.lm import build_tiny_lm

        self.tok = tok
        self.lm = build_tiny_lm(tok, hidden=32, layers=2, heads=2, seed=seed)
        torch.manual_seed(seed)
        self.proj = nn.Linear(D, 32)
        self.drop = nn.Dropout(0.1)  # exercises the RNG state in checkpoints when dropout=True
        self.lm.model.embed_tokens.weight.requires_grad_(False)

    def logprob(self, features: torch.Tensor, captions: list[str]) -> torch.Tensor:
        ids = [self.tok(c, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id] for c in captions]
        width = max(map(len, ids))
        tgt = torch.tensor([i + [0] * (width - len(i)) for i in ids])
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])
        emb = torch.cat([self.drop(self.proj(features)), self.lm.model.embed_tokens(tgt)], 1)
        att = torch.cat([torch.ones(len(ids), T, dtype=torch.long), mask], 1)
        logits = self.lm(inputs_embeds=emb, attention_mask=att).logits[:, T - 1 : -1]
        lp = torch.log_softmax(logits.float(), -1).gather(-1, tgt[..., None])[..., 0]
        return (lp * mask).sum(1)


@pytest.fixture(scope="module")
def tok():
    from caredpo.captioner.lm import build_tiny_tokenizer

    return build_tiny_tokenizer()


CAPTIONS = ["a red circle moves left", "a red circle moves right", "a red circle", "a blue square turns green"]


def _setup(tok, tmp_path, k=3, groups=2, per_group=3, make=None, shape=(T, D)):
    torch.manual_seed(123)
    feats = {f"v{g}{i}": torch.randn(*shape) for g in range(groups) for i in range(per_group)}
    policy = (make or (lambda: TinyPolicy(tok)))().eval()
    rows = []
    with torch.no_grad():
        for vid in feats:
            g = vid[1]
            caps = CAPTIONS[:k]
            rewards = [float(x) for x in torch.rand(k)]
            best = max(range(k), key=lambda j: rewards[j])
            twins = [u for u in feats if u[1] == g and u != vid]
            ref = policy.logprob(torch.stack([feats[vid]] * k), caps)
            cross = policy.logprob(torch.stack([feats[u] for u in twins]), [caps[best]] * len(twins))
            rows.append(
                {
                    "video_id": vid,
                    "group": f"g{g}",
                    "captions": caps,
                    "rewards": rewards,
                    "ref_logps": ref.tolist(),
                    "best": best,
                    "negatives": twins,
                    "ref_cross_logps": cross.tolist(),
                    "lengths": [5] * k,
                }
            )
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, (lambda ids: torch.stack([feats[i] for i in ids]))


def _params(m):
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def test_first_step_loss_is_log2_when_policy_equals_reference(tok, tmp_path):
    path, feats = _setup(tok, tmp_path)
    cfg = DPOConfig(lambda_video=0.5, max_steps=1, lr=1e-3)
    summary = train_dpo(TinyPolicy(tok), path, feats, tmp_path / "run", cfg, show_progress=False)
    row = metrics_rows(tmp_path / "run")[0]
    assert summary["steps"] == 1 and summary["finished"]
    assert row["loss_caption"] == pytest.approx(math.log(2), abs=1e-5)
    assert row["loss_video"] == pytest.approx(math.log(2), abs=1e-5)
    assert row["loss"] == pytest.approx(1.5 * math.log(2), abs=1e-5)
    assert row["videos"] == 3 and row["n_pairs"] == 9  # one twin group of 3 videos, 3 pairs each


def test_resume_on_the_tiny_video_captioner(tmp_path):
    """The real captioner (LoRA + projector trainable, LM frozen): resume == uninterrupted."""
    from caredpo.captioner.model import CaptionerConfig, VideoCaptioner

    ccfg = CaptionerConfig(lm="tiny", feature_dim=16, num_frames=2, projector_hidden=32, lora_layers=-1, lora_rank=4)
    make = lambda: VideoCaptioner(ccfg)  # noqa: E731
    path, feats = _setup(None, tmp_path, make=make, shape=(2, 4, 16))
    cfg = DPOConfig(epochs=2, save_every=1, lr=1e-2, lambda_nll=0.1)
    full = make()
    frozen_before = {n: p.detach().clone() for n, p in full.named_parameters() if not p.requires_grad}
    train_dpo(full, path, feats, tmp_path / "full", cfg, show_progress=False)
    part = make()
    train_dpo(part, path, feats, tmp_path / "part", cfg, stop_after=1, show_progress=False)
    resumed = make()
    train_dpo(resumed, path, feats, tmp_path / "part", cfg, resume=True, show_progress=False)
    got = dict(resumed.named_parameters())
    assert all(torch.equal(p, got[n]) for n, p in full.named_parameters())
    assert all(torch.equal(p, dict(full.named_parameters())[n]) for n, p in frozen_before.items())
    assert not torch.equal(got["projector.fc1.weight"], make().projector.fc1.weight)
    first = metrics_rows(tmp_path / "full")[0]  # the reference log-probs came from the same captioner
    assert first["loss_caption"] == pytest.approx(math.log(2), abs=1e-4)
    assert first["loss_video"] == pytest.approx(math.log(2), abs=1e-4)


def test_only_trainable_parameters_change(tok, tmp_path):
    path, feats = _setup(tok, tmp_path)
    policy = TinyPolicy(tok)
    before = _params(policy)
    train_dpo(
        policy, path, feats, tmp_path / "run", DPOConfig(max_steps=2, lr=1e-2, lambda_nll=0.1), show_progress=False
    )
    after = _params(policy)
    frozen = "lm.model.embed_tokens.weight"
    assert torch.equal(before[frozen], after[frozen]) and policy.lm.model.embed_tokens.weight.grad is None
    assert not torch.equal(before["proj.weight"], after["proj.weight"])
    assert not torch.equal(
        before["lm.model.layers.0.mlp.up_proj.weight"], after["lm.model.layers.0.mlp.up_proj.weight"]
    )


def test_resume_gives_the_same_weights(tok, tmp_path):
    path, feats = _setup(tok, tmp_path)
    cfg = DPOConfig(epochs=3, save_every=2, lr=1e-2, dropout=True, warmup_steps=2, lambda_nll=0.1)
    full = TinyPolicy(tok)
    train_dpo(full, path, feats, tmp_path / "full", cfg, show_progress=False)
    part = TinyPolicy(tok)
    s1 = train_dpo(part, path, feats, tmp_path / "part", cfg, stop_after=3, show_progress=False)
    assert s1["steps"] == 3 and not s1["finished"]
    with pytest.raises(DataError, match="resume"):
        train_dpo(TinyPolicy(tok), path, feats, tmp_path / "part", cfg, show_progress=False)
    resumed = TinyPolicy(tok)  # a fresh process: SFT weights again, then the checkpoint
    s2 = train_dpo(resumed, path, feats, tmp_path / "part", cfg, resume=True, show_progress=False)
    assert s2["steps"] == 6 and s2["finished"]
    for name, p in full.named_parameters():
        assert torch.equal(p, dict(resumed.named_parameters())[name]), name
    losses = [r["loss"] for r in metrics_rows(tmp_path / "full")]
    assert [r["loss"] for r in metrics_rows(tmp_path / "part")] == losses and len(losses) == 6
    with pytest.raises(DataError, match="beta"):
        train_dpo(
            TinyPolicy(tok),
            path,
            feats,
            tmp_path / "part",
            DPOConfig(epochs=3, beta=0.2),
            resume=True,
            show_progress=False,
        )


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tok, tmp_path):
    path, feats = _setup(tok, tmp_path)
    policy = TinyPolicy(tok)
    calls = {"n": 0}
    real = policy.logprob

    def flaky(f, c):
        calls["n"] += 1
        out = real(f, c)
        return out * float("nan") if calls["n"] >= 3 else out

    policy.logprob = flaky
    with pytest.raises(NonFiniteLossError, match=r"step 3: non-finite loss.*step 2"):
        train_dpo(
            policy, path, feats, tmp_path / "run", DPOConfig(epochs=3, save_every=1, lr=1e-2), show_progress=False
        )
    ckpt = Checkpoint(tmp_path / "run")
    assert ckpt.step() == 2 and (tmp_path / "run" / CHECKPOINT).is_dir()
    for name, p in ckpt.weights().items():  # no update was applied after the bad loss
        assert torch.equal(p, dict(policy.named_parameters())[name])
    assert len(metrics_rows(tmp_path / "run")) == 2


def test_batches_hold_whole_twin_groups():
    rows = [{"video_id": f"v{i}", "group": f"g{i % 5}"} for i in range(20)] + [{"video_id": "solo", "group": None}]
    b0 = twin_batches(rows, 2, seed=0, epoch=0)
    assert sorted(sum(b0, [])) == list(range(21))
    for batch in b0:
        groups = {rows[i]["group"] for i in batch}
        assert all(sum(r["group"] == g for r in rows) == sum(rows[i]["group"] == g for i in batch) for g in groups)
    assert b0 == twin_batches(rows, 2, seed=0, epoch=0) and b0 != twin_batches(rows, 2, seed=0, epoch=1)


def test_plain_dpo_scores_only_best_and_worst(tok, tmp_path):
    path, feats = _setup(tok, tmp_path, k=4)
    rows = load_groups(path)[:2]
    policy = TinyPolicy(tok).eval()
    seen = []
    real = policy.logprob
    policy.logprob = lambda f, c: seen.append(len(c)) or real(f, c)
    loss, stats = batch_loss(policy, rows, feats, DPOConfig.for_mode("dpo"))
    assert seen == [4] and stats.n_pairs == 2  # 2 videos x (best, worst), no twin passes
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)
    batch_loss(policy, rows, feats, DPOConfig())
    assert seen[1] == 2 * 4 + 2 * 2  # all 4 captions of 2 videos + best caption under 2 twins each


def test_config_and_data_validation(tmp_path):
    with pytest.raises(ValueError, match="beta"):
        DPOConfig(beta=0)
    with pytest.raises(ValueError, match="for_mode"):
        DPOConfig(mode="dpo")
    assert DPOConfig.for_mode("dpo").pairs == "best_worst"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"video_id": "v", "captions": ["a", "b"], "rewards": [0.1, 0.9], "ref_logps": [-1, -2], "best": 0})
        + "\n"
    )
    with pytest.raises(DataError, match="bad.jsonl:1: v: best=0"):
        load_groups(bad)


def test_training_separates_winners(tok, tmp_path):
    path, feats = _setup(tok, tmp_path, groups=1)
    train_dpo(
        TinyPolicy(tok), path, feats, tmp_path / "run", DPOConfig(epochs=12, lr=3e-3, beta=0.5), show_progress=False
    )
    rows = metrics_rows(tmp_path / "run")
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.05
    assert rows[-1]["margin"] > 0 and rows[-1]["reward_acc"] > 0.5


def test_metrics_pool_each_pass_over_its_steps(tok, tmp_path):
    """metrics.json's `passes`: per epoch, accuracies weighted by their counts, as a naive loop pools them."""
    path, feats = _setup(tok, tmp_path, groups=2)
    cfg = DPOConfig(epochs=2, lr=3e-3, lambda_nll=0.1, save_every=0)
    summary = train_dpo(TinyPolicy(tok), path, feats, tmp_path / "run", cfg, show_progress=False)
    rows = metrics_rows(tmp_path / "run")
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["passes"] == summary["passes"]
    assert [p["epoch"] for p in summary["passes"]] == [0, 1]
    for p in summary["passes"]:
        mine = [r for r in rows if r["epoch"] == p["epoch"]]
        assert p["steps"] == len(mine) == 2  # two twin groups, one a step
        pairs = sum(r["n_pairs"] for r in mine)
        assert p["reward_acc"] == pytest.approx(sum(r["reward_acc"] * r["n_pairs"] for r in mine) / pairs, abs=1e-4)
        twins = sum(r["twins"] for r in mine)
        assert p["video_acc"] == pytest.approx(sum(r["video_acc"] * r["twins"] for r in mine) / twins, abs=1e-4)
        assert p["loss_nll"] == pytest.approx(sum(r["loss_nll"] * r["nll_videos"] for r in mine) / 6, abs=1e-4)


def test_cli_registers_dpo_command():
    import typer
    from typer.testing import CliRunner

    from caredpo.cli.dpo import register

    app = typer.Typer()
    register(app)

    @app.command("noop")
    def _noop():  # a second command keeps typer in multi-command mode
        pass

    result = CliRunner().invoke(app, ["dpo", "--help"])
    assert result.exit_code == 0
    for opt in ("--groups", "--captioner", "--features", "--mode", "--lambda-video", "--resume"):
        assert opt in result.output


@pytest.mark.slow
def test_cli_dpo_end_to_end_on_tiny_captioner(tmp_path):
    """`caredpo dpo` on a saved tiny captioner + a features folder: trains, saves, resumes."""
    import typer
    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from caredpo.captioner.model import CaptionerConfig, VideoCaptioner
    from caredpo.cli.dpo import register

    ccfg = CaptionerConfig(lm="tiny", feature_dim=16, num_frames=2, projector_hidden=32, lora_layers=1, lora_rank=4)
    VideoCaptioner(ccfg).save_pretrained(tmp_path / "sft")
    make = lambda: VideoCaptioner.from_pretrained(tmp_path / "sft")  # noqa: E731
    path, feats = _setup(None, tmp_path, make=make, shape=(2, 4, 16), groups=1)
    ids = ["v00", "v01", "v02"]
    grid = feats(ids).half()
    save_file({"grid": grid, "global": grid.mean(2)}, str(tmp_path / "features.safetensors"))
    (tmp_path / "features.json").write_text(json.dumps({"video_ids": ids, "num_frames": 2}))
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)
    args = [
        "dpo",
        "--groups",
        str(path),
        "--captioner",
        str(tmp_path / "sft"),
        "--features",
        str(tmp_path),
        "--out",
        str(tmp_path / "run"),
        "--mode",
        "dpo",
        "--epochs",
        "2",
        "--lr",
        "1e-2",
        "--lambda-nll",  # the hand-made rows carry no caption lengths
        "0",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run" / "model" / "config.json").exists()
    rows = metrics_rows(tmp_path / "run")
    assert len(rows) == 2 and rows[0]["loss_video"] == 0.0  # plain DPO: no video group
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)  # fp16 features: ~same as the refs
    res = CliRunner().invoke(app, args + ["--resume"])  # already finished: a no-op that still succeeds
    assert res.exit_code == 0 and len(metrics_rows(tmp_path / "run")) == 2


@pytest.mark.parametrize("precision, tol", [("fp32", 1e-5), ("bf16", 2e-3)])
def test_policy_equals_reference_at_step_0_in_both_precisions(tmp_path, precision, tol):
    """h(v, c) = 0 at step 0: the reference log-probs (one pass per video, as the preference stage
    computes them) and the policy's (the trainer's own batch of own + cross pairs) come from the
    same code path, so the first losses are ln 2, in bf16 too (tol: bf16 rounding of differently
    shaped batches; beta x |h| stays below it)."""
    from caredpo.captioner.model import CaptionerConfig, VideoCaptioner

    ccfg = CaptionerConfig(
        lm="tiny", feature_dim=16, num_frames=2, projector_hidden=32, lora_layers=-1, lora_rank=4, precision=precision
    )
    path, feats = _setup(None, tmp_path, make=lambda: VideoCaptioner(ccfg), shape=(2, 4, 16))
    train_dpo(VideoCaptioner(ccfg), path, feats, tmp_path / "run", DPOConfig(max_steps=1), show_progress=False)
    first = metrics_rows(tmp_path / "run")[0]
    assert first["loss_caption"] == pytest.approx(math.log(2), abs=tol)
    assert first["loss_video"] == pytest.approx(math.log(2), abs=tol)


def test_bf16_and_fp32_losses_of_a_tiny_captioner_agree():
    """The SFT loss of the same weights under bf16 autocast is within 2% of fp32's."""
    from dataclasses import replace

    from caredpo.captioner.model import CaptionerConfig, VideoCaptioner

    ccfg = CaptionerConfig(lm="tiny", feature_dim=16, num_frames=2, projector_hidden=32, lora_layers=-1, lora_rank=4)
    fp32 = VideoCaptioner(ccfg).eval()
    bf16 = VideoCaptioner(replace(ccfg, precision="bf16")).eval()
    bf16.load_state_dict(fp32.state_dict())
    torch.manual_seed(0)
    feats, caps = torch.randn(4, 2, 4, 16), CAPTIONS
    with torch.no_grad():
        a, b = fp32.nll(feats, caps), bf16.nll(feats, caps)
    assert a.dtype == b.dtype == torch.float32
    assert abs(a - b) / a < 0.02 and not torch.equal(a, b)  # the bf16 path really ran
