"""Scale-out benchmark: how to spend the cores (threads or processes) on SFT and DG-DPO steps;
exact torch vs FAISS search at 1M.

    python benchmarks/scale_out.py [--run runs/default-s0] [--steps 4] [--repeats 3]
                                   [--gallery 1000000] [--hnsw] [--skip-sft] [--skip-dpo] [--skip-search]

1. Training steps, three ways of using 2 cores on the same global batch: 1 process x 1 thread,
   1 process x 2 threads (torch intra-op threads), 2 processes x 1 thread (gloo, data-parallel as
   under torchrun). SFT: the run's SFT captioner (SmolLM2-135M, LoRA + projector) on the preset's
   step (8 videos x 2 sentences of the run's train split). DG-DPO: the same captioner on the run's
   preference groups, 2 twin groups a step. Every arm is started with torch.multiprocessing.spawn,
   so start-up is alike and untimed. Step time = median over the steps after one warm-up step
   (rank 0's wall time, its collectives included); the row's value = median over repeats. The
   rows are only meaningful on free cores (the load is printed). Without the run's files a tiny
   random captioner on synthetic data stands in (the numbers then say little).
2. Search: 1000 queries vs a clustered gallery of unit vectors (384-d, like MiniLM embeddings),
   top-10: torch exact (matmul + topk in chunks), FAISS IndexFlatIP (exact), FAISS HNSW32 only with
   --hnsw (its build takes minutes at 1M); recall@10 against exact. Then the evaluation's
   pessimistic ranks: exact chunked count vs FAISS top-100 + exact count for the rest (they must agree).
   GFLOP/s of the exact searches (fp32) against the fp32 matmul peak measured at --threads
   (benchmarks/peak.py).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from peak import describe, measure_peaks, share

DIM, K, QUERIES = 384, 10, 1000


# ---------------------------------------------------------------- DG-DPO, 1 vs 2 processes


def _dpo_inputs(run: Path | None):
    """(policy, preference rows, features fn): the run's captioner and groups, or tiny stand-ins."""
    from caredpo.dpo.train import load_groups

    if run is not None:
        from caredpo.captioner.model import VideoCaptioner
        from caredpo.features import FeatureStore
        from caredpo.pipeline.layout import RunLayout

        layout = RunLayout.load(run)
        policy = VideoCaptioner.from_pretrained(layout.captioner_model("sft"))
        policy.set_trainable()
        return policy, load_groups(layout.groups), FeatureStore.load(layout.features).grid_feats
    return _tiny_inputs()


def _tiny_inputs():
    from caredpo.captioner.model import CaptionerConfig, VideoCaptioner

    torch.manual_seed(0)
    policy = VideoCaptioner(
        CaptionerConfig(lm="tiny", feature_dim=64, num_frames=4, projector_hidden=64, lora_layers=-1)
    )
    policy.set_trainable()
    ids = [f"g{g}v{i}" for g in range(8) for i in range(4)]
    table = dict(zip(ids, torch.randn(len(ids), 4, 4, 64)))
    caps = ["a red circle moves left", "a red circle moves right", "a blue square", "a ball bounces twice"]
    rows = [
        {
            "video_id": v,
            "group": v[:2],
            "captions": caps,
            "rewards": [0.1, 0.4, 0.2, 0.3],
            "ref_logps": [-20.0] * 4,
            "best": 1,
            "negatives": [u for u in ids if u[:2] == v[:2] and u != v],
            "ref_cross_logps": [-21.0] * 3,
        }
        for v in ids
    ]
    return policy, rows, lambda vs: torch.stack([table[v] for v in vs])


ARMS = ((1, 1), (1, 2), (2, 1))  # (processes, threads a process)


def _sft_inputs(run: Path | None):
    """(captioner, dataset, store, SFTConfig): the run's SFT captioner and data at the default
    preset's step shape, or tiny stand-ins."""
    from dataclasses import replace

    from caredpo.pipeline.presets import run_config

    cfg = run_config("default", 0).sft
    if run is None:
        return _tiny_sft_inputs(replace(cfg, val_fraction=0.0))
    from caredpo.captioner.model import VideoCaptioner
    from caredpo.data.splits import with_features
    from caredpo.features import FeatureStore
    from caredpo.pipeline.layout import RunLayout
    from caredpo.pipeline.stages import run_dataset

    layout = RunLayout.load(run)
    store = FeatureStore.load(layout.features)
    ds = with_features(run_dataset(layout.data_source(), 0, log=lambda s: None), store.ids, str(layout.features))
    return VideoCaptioner.from_pretrained(layout.captioner_model("sft")), ds, store, cfg


class _TinyStore:
    """What the SFT trainer reads of a FeatureStore: ids and grid_feats."""

    def __init__(self, ids: list[str], width: int):
        self.ids, self._f = ids, dict(zip(ids, torch.randn(len(ids), 4, 4, width)))

    def grid_feats(self, ids) -> torch.Tensor:
        return torch.stack([self._f[i] for i in ids])


def _tiny_sft_inputs(cfg):
    from caredpo.captioner.model import CaptionerConfig, VideoCaptioner
    from caredpo.records import Dataset, Sentence, Video

    torch.manual_seed(0)
    model = VideoCaptioner(CaptionerConfig(lm="tiny", feature_dim=64, num_frames=4, projector_hidden=64))
    videos = [Video(f"v{i}", f"v{i}.mp4", "train", group=f"g{i}") for i in range(16)]
    sentences = [Sentence(v.id, f"a red circle moves {d}") for v in videos for d in ("up", "down")]
    store = _TinyStore([v.id for v in videos], model.config.input_dim)
    return model, Dataset(root=".", videos=videos, sentences=sentences), store, cfg


def _timed(module, name: str, wall: list[float]):
    """Wrap module.name so each call's wall seconds are appended to `wall`."""
    fn = getattr(module, name)

    def timed(*a, **kw):
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        wall.append(time.perf_counter() - t0)
        return out

    setattr(module, name, timed)


def _sft(run: Path | None, out: str, steps: int) -> list[float]:
    from dataclasses import replace

    import caredpo.captioner.sft as sft

    wall: list[float] = []
    _timed(sft, "train_step", wall)
    model, ds, store, cfg = _sft_inputs(run)
    cfg = replace(cfg, steps=steps + 1, align_steps=0, val_every=0, val_videos=0, save_every=10**6)
    sft.train_sft(model, ds, store, out, cfg, show_progress=False, log=lambda s: None)
    return wall


def _dpo(run: Path | None, out: str, steps: int) -> list[float]:
    import caredpo.dpo.train as trainer
    from caredpo.dpo.config import DPOConfig

    wall: list[float] = []
    _timed(trainer, "_step", wall)
    policy, rows, feats = _dpo_inputs(run)
    cfg = DPOConfig(groups_per_batch=2, max_steps=steps + 1, save_every=10**6, lr=1e-5)
    trainer.train_dpo(policy, rows, feats, out, cfg, show_progress=False)
    return wall


KINDS = {"sft": _sft, "dg-dpo": _dpo}


def _worker(rank: int, world: int, threads: int, port: int, kind: str, run: str | None, out: str, steps: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft vs transformers 5
    from caredpo import dist

    with dist.session():
        wall = KINDS[kind](Path(run) if run else None, out, steps)
        if dist.is_main():
            Path(out, "step_times.json").write_text(json.dumps(wall[1:]))  # the first step warms up


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step_rows(kind: str, run: Path | None, steps: int, repeats: int) -> list[tuple[int, int, float, list[float]]]:
    """[(processes, threads, median step s over repeats, per-repeat medians)] for each of ARMS."""
    import torch.multiprocessing as mp

    out = []
    for world, threads in ARMS:
        medians = []
        for _ in range(repeats):
            with tempfile.TemporaryDirectory() as tmp:
                args = (world, threads, _free_port(), kind, str(run) if run else None, tmp, steps)
                mp.spawn(_worker, args=args, nprocs=world, join=True)
                medians.append(statistics.median(json.loads(Path(tmp, "step_times.json").read_text())))
        out.append((world, threads, statistics.median(medians), medians))
    return out


def print_steps(kind: str, run: Path | None, steps: int, repeats: int) -> None:
    what = f"{run}: its SFT captioner" if run else "tiny random captioner (no run found)"
    shape = "8 videos x 2 sentences a step" if kind == "sft" else "2 twin groups a step"
    print(
        f"\n{kind}, {what}, {shape}; median step of {steps} (after 1 warm-up), median of {repeats} repeats",
        flush=True,
    )
    rows = step_rows(kind, run, steps, repeats)
    base = rows[0][2]
    print(f"{'processes':>9s} {'threads':>8s} {'step s':>8s} {'steps/s':>8s} {'vs 1x1':>7s}  per-repeat medians")
    for world, threads, sec, medians in rows:
        print(
            f"{world:9d} {threads:8d} {sec:8.2f} {1 / sec:8.3f} {base / sec:6.2f}x  "
            + " ".join(f"{m:.2f}" for m in medians),
            flush=True,
        )
    print(f"machine load after the rows (1-min average): {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


# ---------------------------------------------------------------- search at scale


def unit(n: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((n, DIM), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(n_gallery: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(queries [1000, D], gallery [V, D], truth [1000]): clustered like real embeddings, each query
    near its ground-truth item."""
    rng = np.random.default_rng(seed)
    centres = unit(1024, rng)
    gallery = centres[rng.integers(0, 1024, n_gallery)]
    for i in range(0, n_gallery, 100_000):  # in place, in slices: no second 1.5 GB temporary
        gallery[i : i + 100_000] += 0.5 * unit(min(100_000, n_gallery - i), rng)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    truth = rng.integers(0, n_gallery, QUERIES)
    queries = gallery[truth] + 0.3 * unit(QUERIES, rng)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return torch.from_numpy(queries), torch.from_numpy(gallery), torch.from_numpy(truth).long()


def timed(fn, repeats: int):
    """(median seconds, last result)."""
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def search_rows(n_gallery: int, repeats: int, hnsw: bool) -> tuple[list[tuple], tuple]:
    """[(method, build s, search s, recall@10)], and (ranks: torch s, FAISS s, agree)."""
    from caredpo.retrieval.search import SearchConfig, build_index, counted_ranks, search_index, t2v_ranks, topk

    q, g, truth = clustered(n_gallery)
    exact_cfg = SearchConfig(exact_max=n_gallery)
    t_exact, (_, exact) = timed(lambda: topk(q, g, K, exact_cfg), repeats)
    rows = [("torch exact (matmul + topk)", 0.0, t_exact, 1.0)]
    methods = [("faiss IndexFlatIP (exact)", SearchConfig(exact_max=0))]
    if hnsw:
        methods.append(("faiss HNSW32 (efSearch=64)", SearchConfig(exact_max=0, index="hnsw")))
    for name, cfg in methods:
        t0 = time.perf_counter()
        index = build_index(g, cfg)
        built = time.perf_counter() - t0
        sec, (_, found) = timed(lambda index=index, cfg=cfg: search_index(index, q, K, cfg.chunk), repeats)
        recall = np.mean([len(set(a.tolist()) & set(b.tolist())) / K for a, b in zip(found, exact)])
        rows.append((name, built, sec, float(recall)))
        del index
    t_count, by_count = timed(lambda: counted_ranks(q, g, truth, 4096), 1)
    t_faiss, by_faiss = timed(lambda: t2v_ranks(q, g, truth, SearchConfig(exact_max=0)), 1)
    return rows, (t_count, t_faiss, bool(torch.equal(by_count, by_faiss)), float(by_count.float().median()))


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs/default-s0"), help="a finished run (captioner, prefs)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per repeat and arm (after 1 warm-up)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gallery", type=int, default=1_000_000)
    ap.add_argument("--threads", type=int, default=2, help="threads of the search part")
    ap.add_argument("--hnsw", action="store_true", help="also build HNSW32 (minutes at 1M)")
    ap.add_argument("--skip-sft", action="store_true")
    ap.add_argument("--skip-dg-dpo", "--skip-dpo", dest="skip_dg_dpo", action="store_true")
    ap.add_argument("--skip-search", action="store_true")
    args = ap.parse_args()
    from caredpo.pipeline.layout import RunLayout

    run = args.run if RunLayout.load(args.run).groups.exists() else None
    for kind in [k for k in KINDS if not getattr(args, f"skip_{k.replace('-', '_')}")]:
        print_steps(kind, run, args.steps, args.repeats)
    if not args.skip_search:
        import faiss

        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
        peaks = measure_peaks()  # at --threads
        rows, (t_count, t_faiss, agree, median_rank) = search_rows(args.gallery, args.repeats, args.hnsw)
        flop = 2 * QUERIES * args.gallery * DIM
        print(
            f"\nsearch {QUERIES} queries x {args.gallery:,} x {DIM}-d gallery, top-{K}, {args.threads} threads "
            f"(median of {args.repeats}); {describe(peaks)}"
        )
        print(
            f"{'method':30s} {'build s':>8s} {'search s':>9s} {'GFLOP/s':>8s} {'of fp32 peak':>13s} {'recall@10':>10s}"
        )
        for name, built, sec, recall in rows:  # GFLOP/s only where the whole product is computed (fp32)
            exact = "HNSW" not in name
            rate = f"{flop / sec / 1e9:8.0f}" if exact else f"{'-':>8s}"
            of_peak = f"{share(flop / sec / 1e9, 'fp32', peaks):13.0%}" if exact else f"{'-':>13s}"
            print(f"{name:30s} {built:8.1f} {sec:9.2f} {rate} {of_peak} {recall:10.3f}")
        print(
            f"pessimistic ranks (evaluation): exact chunked count {t_count:.2f} s, FAISS top-100 + count "
            f"{t_faiss:.2f} s; identical: {agree} (median rank {median_rank:.0f})"
        )


if __name__ == "__main__":
    sys.exit(main())
