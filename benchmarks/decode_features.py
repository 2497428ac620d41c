"""Frames per second of decoding and of frame-feature extraction, on TwinClips `default`.

    python benchmarks/decode_features.py --data runs/default-s0/data [--limit 64] [--repeats 3]

Decoding: our sampler (`read_frames`, T of 16 frames) against the naive peer that converts every
frame to RGB and picks T afterwards. Features: the pipeline as shipped (decode thread overlapping
the CNN, channels_last) against the plain loop (decode inline, contiguous tensors). Medians over
repeats; the CNN runs in fp32, so its FLOP rate is set against the fp32 matmul peak measured at
the start of the run at --threads (benchmarks/peak.py).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch

from caredpo.features import FeatureConfig, encode_frames, extract_features, load_frame_encoder, preprocess
from caredpo.video import read_frames, sample_indices, square_resize
from peak import describe, measure_peaks, share


def load_data(path: Path, limit: int):
    from caredpo.data import load_dataset

    if not path.exists():
        from caredpo.data.twinclips import TwinClipsConfig, generate_twinclips

        generate_twinclips(TwinClipsConfig.preset("default", 0), path)
    ds = load_dataset(path)
    ds.videos = ds.videos[:limit]
    ds.sentences = [s for s in ds.sentences if s.video_id in {v.id for v in ds.videos}]
    return ds


def naive_decode(path: Path, num_frames: int, size: int) -> np.ndarray:
    with av.open(str(path)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    return np.stack([square_resize(frames[i], size) for i in sample_indices(len(frames), num_frames)])


def time_decode(fn, paths, cfg) -> float:
    t = time.perf_counter()
    for p in paths:
        fn(p, cfg.num_frames, cfg.size)
    return len(paths) * cfg.num_frames / (time.perf_counter() - t)


def time_cnn(cfg: FeatureConfig, channels_last: bool) -> tuple[float, float]:
    """Frames/s and GFLOP/s of the CNN alone on a batch of random frames."""
    from torch.utils.flop_counter import FlopCounterMode

    model = load_frame_encoder(cfg.size)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    x = preprocess(
        np.random.default_rng(0).integers(0, 255, (cfg.batch_size, cfg.size, cfg.size, 3), dtype=np.uint8),
        channels_last,
    )
    with FlopCounterMode(display=False) as counter:
        encode_frames(model, x[:1])
    encode_frames(model, x)  # warm-up
    t = time.perf_counter()
    encode_frames(model, x)
    fps = cfg.batch_size / (time.perf_counter() - t)
    return fps, fps * counter.get_total_flops() / 1e9


def time_extract(ds, cfg: FeatureConfig) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        extract_features(ds, tmp, cfg, progress=False)
        return len(ds.videos) * cfg.num_frames / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("runs/default-s0/data"))
    ap.add_argument("--limit", type=int, default=64, help="videos to time (the first N)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    peaks = measure_peaks()  # at --threads
    ds = load_data(args.data, args.limit)
    paths = [ds.video_path(v) for v in ds.videos]
    base = FeatureConfig(num_frames=args.frames, size=args.size)
    med = lambda f: statistics.median(f() for _ in range(args.repeats))  # noqa: E731
    rows = [
        ("decode: naive (every frame to RGB)", med(lambda: time_decode(naive_decode, paths, base)), ""),
        ("decode: read_frames", med(lambda: time_decode(read_frames, paths, base)), ""),
    ]
    for cl in (False, True):
        fps, gflops = sorted(time_cnn(base, cl) for _ in range(args.repeats))[args.repeats // 2]
        rows.append(
            (
                f"CNN only, channels_last={cl}",
                fps,
                f"{gflops:.1f} GFLOP/s = {share(gflops, 'fp32', peaks):.0%} of fp32 peak",
            )
        )
    variants = {
        "features: inline decode, contiguous (peer)": FeatureConfig(
            **{**base.__dict__, "decode_workers": 0, "channels_last": False}
        ),
        "features: decode thread, channels_last (ours)": base,
    }
    for name, cfg in variants.items():
        rows.append((name, med(lambda cfg=cfg: time_extract(ds, cfg)), ""))
    print(
        f"\n{len(paths)} videos, {args.frames} frames at {args.size} px, {args.threads} torch threads, "
        f"median of {args.repeats}; {describe(peaks)}"
    )
    print(f"{'what':48s} {'frames/s':>10s}  note")
    for name, fps, note in rows:
        print(f"{name:48s} {fps:10.1f}  {note}")
    print(f"{'ratio ours / peer (features)':48s} {rows[-1][1] / rows[-2][1]:10.2f}")


if __name__ == "__main__":
    main()
