"""Scale-out: world size 2 (gloo, two spawned processes) equals world size 1; sharded files merge
without loss or duplicates after a kill.

One spawn runs every two-process scenario (process start and imports dominate: ~10 s); the
tests compare its outputs with the same work done here in one process.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from caredpo import dist
from caredpo.io import part_path, part_paths, read_jsonl

WORLD = 2
T_CAP, F_CAP = 2, 16  # frames, feature width of the tiny DPO captioner
GROUP_SIZES = (3, 2, 4)  # ragged twin groups: the per-process loss weights matter
CAPS = ["a red circle moves left", "a red circle moves right", "a red circle", "a blue square turns green"]
pytestmark = pytest.mark.usefixtures("one_thread")


# ---- inputs (built once, read by both the spawned processes and this one) -------------------------


def _tiny_captioner_cfg(**kw):
    from caredpo.captioner.model import CaptionerConfig

    return CaptionerConfig(
        lm="tiny", feature_dim=F_CAP, num_frames=T_CAP, projector_hidden=32, lora_layers=1, lora_rank=4, **kw
    )


def _make_dpo_inputs(root: Path) -> None:
    """A saved tiny captioner (LoRA B perturbed so every part trains), a features folder and a
    preference file with ragged twin groups, K = 3, reference log-probs from the captioner."""
    from safetensors.torch import save_file

    from caredpo.captioner.model import VideoCaptioner

    torch.manual_seed(0)
    model = VideoCaptioner(_tiny_captioner_cfg())
    with torch.no_grad():
        for n, p in model.lm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model.save_pretrained(root / "sft")
    model.eval()
    ids = [f"g{g}v{i}" for g, size in enumerate(GROUP_SIZES) for i in range(size)]
    grid = torch.randn(len(ids), T_CAP, 4, F_CAP).half()
    (root / "feats").mkdir()
    save_file({"grid": grid, "global": grid.mean(2)}, str(root / "feats" / "features.safetensors"))
    (root / "feats" / "features.json").write_text(json.dumps({"video_ids": ids, "num_frames": T_CAP}))
    feats = dict(zip(ids, grid.float()))
    rows = []
    with torch.no_grad():
        for vid in ids:
            g = vid.split("v")[0]
            rewards = torch.rand(3).tolist()
            best = max(range(3), key=lambda j: rewards[j])
            twins = [u for u in ids if u.startswith(g + "v") and u != vid]
            ref = model.logprob(torch.stack([feats[vid]] * 3), CAPS[:3])
            cross = model.logprob(torch.stack([feats[u] for u in twins]), [CAPS[best]] * len(twins))
            rows.append(
                {
                    "video_id": vid,
                    "group": g,
                    "captions": CAPS[:3],
                    "rewards": rewards,
                    "ref_logps": ref.tolist(),
                    "best": best,
                    "negatives": twins,
                    "ref_cross_logps": cross.tolist(),
                    "lengths": [5, 6, 4],
                }
            )
    (root / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _dpo_args(root: Path, out: str) -> list[str]:
    return [
        "dpo",
        "--groups",
        str(root / "prefs.jsonl"),
        "--captioner",
        str(root / "sft"),
        "--features",
        str(root / "feats"),
        "--out",
        str(root / out),
        "--epochs",
        "2",
        "--lr",
        "1e-2",
        "--lambda-nll",
        "0.1",
        "--groups-per-batch",
        "2",
        "--save-every",
        "100",
    ]


def _retriever_cfg():
    from test_retriever import smoke_cfg

    return smoke_cfg(max_steps=3, batch_groups=3, dropout=False, save_every=0)


CAP_IDS = [f"c{i}" for i in range(7)]


def _gen_model(root: Path):
    from caredpo.captioner.model import VideoCaptioner

    return VideoCaptioner.from_pretrained(root / "gen_model").eval()


def _sampling():
    from caredpo.captioner.generate import SamplingConfig

    return SamplingConfig(n=2, temperature=1.0, max_new_tokens=6, seed=3, batch_videos=2)


def _gen_store():
    from test_captioner import FakeStore

    return FakeStore(CAP_IDS, seed=5)


class _Counting:
    """Wraps a captioner: counts the videos it is asked to caption."""

    def __init__(self, model, crash_after: int | None = None):
        self.model, self.videos, self.calls, self.crash_after = model, 0, 0, crash_after
        self.seeds_per_video = True

    def generate(self, feats, **kw):
        self.calls += 1
        if self.crash_after is not None and self.calls > self.crash_after:
            raise KeyboardInterrupt  # a killed process
        self.videos += feats.shape[0]
        return self.model.generate(feats, **kw)


def _sft_inputs():
    """Tiny captioner, 5 clips (ragged shares of a 3-video step), alignment and SFT with a val pass."""
    from caredpo.captioner.model import VideoCaptioner
    from caredpo.captioner.sft import SFTConfig
    from test_captioner import TINY, FakeStore, tiny_dataset

    ds = tiny_dataset(6)
    cfg = SFTConfig(
        steps=4, videos_per_step=3, captions_per_video=2, lr_projector=1e-2, lr_lora=1e-2, warmup_steps=1,
        val_fraction=0.2, val_every=2, save_every=2, align_steps=3, align_batch_videos=3,
    )  # fmt: skip
    return VideoCaptioner(TINY), ds, FakeStore([v.id for v in ds.videos]), cfg


def _prefs_inputs():
    from test_dpo_prefs import ListCaptioner, Store, WordScorer, dataset

    ds = dataset(groups=3)
    return (
        ListCaptioner(),
        WordScorer(),
        ds,
        Store([v.id for v in ds.videos]),
        {v.id: "a red circle" for v in ds.videos},
    )


# ---- the two-process run ------------------------------------------------------------------------


def _worker(rank: int, port: int, root: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    root = Path(root)
    with dist.session():
        assert dist.world_size() == WORLD and dist.rank() == rank
        _scenarios(root)


def _scenarios(root: Path) -> None:
    from caredpo.captioner.generate import generate_captions
    from caredpo.captioner.sft import train_sft
    from caredpo.cli import main
    from caredpo.dpo.prefs import PrefsConfig, RetrieverReward, build_preferences
    from caredpo.retrieval.train import train_retriever
    from test_retriever import synthetic

    assert main(_dpo_args(root, "dpo2")) == 0  # the CLI, as torchrun runs it
    model, ds, store, cfg = _sft_inputs()
    train_sft(model, ds, store, root / "sft2", cfg, show_progress=False, log=lambda s: None)
    ds, feats = synthetic()
    train_retriever(_retriever_cfg(), ds, feats, root / "ret2", progress=False)
    generate_captions(_gen_model(root), _gen_store(), CAP_IDS, root / "caps2.jsonl", _sampling(), show_progress=False)
    counting = _Counting(_gen_model(root))  # restart of a killed sharded run (parts prepared by the test)
    generate_captions(
        counting, _gen_store(), CAP_IDS, root / "restart" / "caps.jsonl", _sampling(), show_progress=False
    )
    (root / f"restart_videos{dist.rank()}").write_text(str(counting.videos))
    cap, scorer, ds, store, greedy = _prefs_inputs()
    build_preferences(
        cap,
        RetrieverReward(scorer, store),
        ds,
        store,
        root / "prefs2",
        greedy,
        PrefsConfig(num_samples=4),
        show_progress=False,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def root(tmp_path_factory, one_thread):
    """Inputs, a partial 'killed' sharded caption run, then the two-process run over all of it."""
    import torch.multiprocessing as mp

    from caredpo.captioner.model import VideoCaptioner
    from test_captioner import TINY

    root = tmp_path_factory.mktemp("dist")
    _make_dpo_inputs(root)
    torch.manual_seed(1)
    gen = VideoCaptioner(replace(TINY, seed=1))
    with torch.no_grad():
        for n, p in gen.lm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    gen.save_pretrained(root / "gen_model")
    _kill_a_sharded_run(root / "restart" / "caps.jsonl")
    mp.spawn(_worker, args=(_free_port(), str(root)), nprocs=WORLD, join=True)
    return root


def _kill_a_sharded_run(out: Path) -> None:
    """Rank 0 and rank 1 each finish one batch, then die; rank 1 dies mid-line."""
    from caredpo.captioner.generate import generate_captions

    for r in range(WORLD):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(dist, "world_size", lambda: WORLD)
            mp.setattr(dist, "rank", lambda r=r: r)
            with pytest.raises(KeyboardInterrupt):
                generate_captions(
                    _Counting(_gen_model(out.parent.parent), crash_after=1),
                    _gen_store(),
                    CAP_IDS,
                    out,
                    _sampling(),
                    show_progress=False,
                )
    with part_path(out, 1).open("a") as f:
        f.write('{"video_id": "c7", "capt')  # torn: the kill came mid-write
    assert [len(list(read_jsonl(p))) for p in part_paths(out)] == [2, 2] and not out.exists()


# ---- training: world size 2 == world size 1 ------------------------------------------------------


def test_dg_dpo_two_processes_equal_one(root):
    from caredpo.cli import main
    from caredpo.dpo.train import metrics_rows

    assert main(_dpo_args(root, "dpo1")) == 0
    from caredpo.training import Checkpoint

    one, two = Checkpoint(root / "dpo1"), Checkpoint(root / "dpo2")
    assert one.step() == two.step() == 4  # 3 groups / 2 per step x 2 epochs; the last step of an epoch
    start = _initial_trainable(root)  # has one group: one process sits it out
    moved, w1, w2 = 0, one.weights(), two.weights()
    for name, p in w1.items():
        torch.testing.assert_close(w2[name], p, atol=1e-5, rtol=0, msg=name)
        moved += not torch.equal(p, start[name])
    assert moved == len(w1)  # every trainable tensor changed: the comparison means something
    m1, m2 = metrics_rows(root / "dpo1"), metrics_rows(root / "dpo2")
    assert len(m1) == len(m2) == 4
    for a, b in zip(m1, m2):  # rank 0 logs the whole batch's stats, as one process does
        assert a.keys() == b.keys()
        for k in ("loss", "loss_caption", "loss_video", "loss_nll", "reward_acc", "margin", "video_acc", "grad_norm"):
            assert b[k] == pytest.approx(a[k], abs=1e-5), k
        assert (a["n_pairs"], a["videos"]) == (b["n_pairs"], b["videos"])
    assert (root / "dpo2" / "model" / "config.json").exists()


def test_sft_two_processes_equal_one(root):
    from caredpo.captioner.model import VideoCaptioner
    from caredpo.captioner.sft import run_weights, train_sft

    model, ds, store, cfg = _sft_inputs()
    start = {n: t.clone() for n, t in run_weights(model).items()}
    one = train_sft(model, ds, store, root / "sft1", cfg, show_progress=False, log=lambda s: None)
    two = VideoCaptioner.from_pretrained(root / "sft2" / "model")
    w1, w2 = run_weights(model), run_weights(two)
    assert w1.keys() == w2.keys()
    for name, p in w1.items():  # Adam's first steps turn summation-order noise into ~1e-5 moves
        torch.testing.assert_close(w2[name], p, atol=1e-4, rtol=0, msg=name)
    assert all(not torch.equal(p, start[n]) for n, p in w1.items() if "lora_A" not in n)  # all trained
    rows = lambda run: list(read_jsonl(root / run / "log.jsonl"))  # noqa: E731
    assert [r["step"] for r in rows("sft2")] == [1, 2, 3, 4]
    for a, b in zip(rows("sft1"), rows("sft2")):  # rank 0 logs the whole step's loss
        assert b.keys() == a.keys() and b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b.get("val_loss") == pytest.approx(a.get("val_loss"), abs=1e-5)
    align = lambda run: json.loads((root / run / "align.json").read_text())  # noqa: E731
    assert align("sft2")["last_loss"] == pytest.approx(align("sft1")["last_loss"], abs=1e-5)
    summary = json.loads((root / "sft2" / "metrics.json").read_text())
    assert summary["processes"] == 2 and one["processes"] == 1
    assert summary["final_val_loss"] == pytest.approx(one["final_val_loss"], abs=1e-5)


def _initial_trainable(root: Path) -> dict:
    from caredpo.captioner.model import VideoCaptioner

    model = VideoCaptioner.from_pretrained(root / "sft")
    model.set_trainable()
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def test_retriever_two_processes_equal_one(root):
    from caredpo.retrieval.model import Retriever
    from caredpo.retrieval.train import train_retriever
    from test_retriever import synthetic

    ds, feats = synthetic()
    one, m1 = train_retriever(_retriever_cfg(), ds, feats, root / "ret1", progress=False)
    two = Retriever.from_pretrained(root / "ret2" / "model")
    init = Retriever(_retriever_cfg().model)
    for (name, a), b, _ in zip(one.state_dict().items(), two.state_dict().values(), init.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0, msg=name)
    assert not torch.equal(one.video_proj.weight, init.video_proj.weight)
    losses = lambda run: [r["loss"] for r in read_jsonl(root / run / "log.jsonl") if "loss" in r]  # noqa: E731
    assert losses("ret2") == pytest.approx(losses("ret1"), abs=1e-5) and len(losses("ret1")) == 3
    m2 = json.loads((root / "ret2" / "metrics.json").read_text())
    assert m2["t2v"] == pytest.approx(m1["t2v"]) and m2["step"] == 3


def test_gather_with_grad_is_the_identity_in_one_process():
    x = torch.randn(3, 4, requires_grad=True)
    assert dist.gather_with_grad(x, [3]) is x and dist.shard_sizes(7, 3) == [3, 2, 2]
    assert dist.shard_slice(5) == slice(0, 5) and dist.world_size() == 1 and dist.is_main()
    with dist.session():  # no WORLD_SIZE: a no-op
        assert not dist.is_initialized()


# ---- sharded files ------------------------------------------------------------------------------


def test_sharded_generation_equals_one_process(root):
    from caredpo.captioner.generate import generate_captions

    one = generate_captions(
        _gen_model(root), _gen_store(), CAP_IDS, root / "caps1.jsonl", _sampling(), show_progress=False
    )
    assert (root / "caps2.jsonl").read_bytes() == one.read_bytes()
    assert [r["video_id"] for r in read_jsonl(one)] == CAP_IDS and not part_paths(root / "caps2.jsonl")
    rows = {r["video_id"]: r["captions"] for r in read_jsonl(one)}
    assert len({c for caps in rows.values() for c in caps}) > 3  # sampled, not all alike


def test_killed_sharded_run_restarts_without_loss_or_duplicates(root):
    out = root / "restart" / "caps.jsonl"
    assert out.read_bytes() == (root / "caps2.jsonl").read_bytes()  # == an uninterrupted run
    assert not part_paths(out)
    generated = sum(int((root / f"restart_videos{r}").read_text()) for r in range(WORLD))
    assert generated == len(CAP_IDS) - 4  # the 4 whole rows written before the kill were not redone


def test_per_video_seeds_do_not_depend_on_the_batch(root):
    from caredpo.captioner.generate import video_seed

    model, store = _gen_model(root), _gen_store()
    kw = dict(n=2, temperature=1.0, max_new_tokens=6)
    seeds = [video_seed(3, v) for v in CAP_IDS[:4]]
    together = model.generate(store.grid_feats(CAP_IDS[:4]), seed=seeds, **kw)
    alone = [model.generate(store.grid_feats([v]), seed=[s], **kw)[0] for v, s in zip(CAP_IDS[:4], seeds)]
    assert together == alone and video_seed(3, "c0") != video_seed(4, "c0")


def test_sharded_preferences_equal_one_process(root):
    from caredpo.dpo.prefs import PrefsConfig, RetrieverReward, build_preferences

    cap, scorer, ds, store, greedy = _prefs_inputs()
    one = build_preferences(
        cap,
        RetrieverReward(scorer, store),
        ds,
        store,
        root / "prefs1",
        greedy,
        PrefsConfig(num_samples=4),
        show_progress=False,
    )
    assert (root / "prefs2" / "groups.jsonl").read_bytes() == one.read_bytes()
    assert json.loads((root / "prefs2" / "prefs.json").read_text()) == json.loads(
        (root / "prefs1" / "prefs.json").read_text()
    )


def test_merge_keeps_existing_rows_and_drops_repeats(tmp_path):
    from caredpo.io import merge_parts

    out = tmp_path / "x.jsonl"
    line = lambda v: json.dumps({"video_id": v}) + "\n"  # noqa: E731
    out.write_text(line("b") + '{"video_id": "to')  # a torn tail of a killed single-process run
    part_path(out, 0).write_text(line("c") + line("b"))
    part_path(out, 3).write_text(line("a") + line("z") + '{"vid')
    assert merge_parts(out, ["a", "b", "c"]) == 3
    assert out.read_text() == line("b") + line("a") + line("c") + line("z")
    assert not part_paths(out) and merge_parts(out, ["a"]) == 0


def test_dpo_refuses_fewer_groups_per_step_than_processes(tmp_path, monkeypatch):
    from caredpo.dpo.config import DPOConfig
    from caredpo.dpo.train import train_dpo
    from caredpo.records import DataError

    monkeypatch.setattr(dist, "world_size", lambda: 2)
    rows = [{"video_id": "v", "captions": ["a", "b"], "rewards": [0.0, 1.0], "ref_logps": [0.0, 0.0], "best": 1}]
    with pytest.raises(DataError, match="groups_per_batch=1 is below the 2 processes"):
        train_dpo(torch.nn.Linear(1, 1), rows, lambda ids: torch.zeros(len(ids), 1), tmp_path, DPOConfig())
