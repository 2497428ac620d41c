"""Reranker scoring speed: prefix reuse vs one full sequence per (candidate, query) pair, side by side.

    python benchmarks/reranker_speed.py [--captioner RUN/captioner/sft/model | --lm tiny]
                                        [--candidates 16] [--queries 16] [--threads 2] [--precision auto]

Both rows score the same candidates x queries pairs with `Reranker.score_pairs` (no gradients):
  prefix reuse  each candidate's [visual][caption] prefix runs once, its KV cache extended by every query
  per pair      the candidate rows repeated once per query, so every pair runs its own prefix (what a
                reranker without a cache does)
and must give the same scores (printed: the largest difference). Reported: pairs/s (median of
--repeats), GFLOP/s counting 2 x non-embedding params x tokens run, and that as a share of the
matmul peak of the precision used, measured at the start of the run (benchmarks/peak.py).
"""

from __future__ import annotations

import argparse

import torch

from peak import describe, measure_peaks, median_seconds, share

CAPTION = "a small red circle slides from left to right over the grass and turns blue halfway"
QUERY = "a red circle moves to the right on grass, then becomes blue"


def build(args):
    from caredpo.captioner.model import CaptionerConfig, VideoCaptioner
    from caredpo.rerank.model import Reranker, RerankerConfig

    if args.captioner:
        captioner = VideoCaptioner.from_pretrained(args.captioner)
    else:
        captioner = VideoCaptioner(CaptionerConfig(lm=args.lm, num_frames=8, colour_bins=64, clip_tokens=4))
    return Reranker(RerankerConfig(precision=args.precision), captioner).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--captioner", default=None, help="a saved captioner folder (default: a fresh one on --lm)")
    ap.add_argument("--lm", default="smollm2")
    ap.add_argument("--candidates", type=int, default=16)
    ap.add_argument("--queries", type=int, default=16, help="queries scored against every candidate")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from caredpo.precision import resolve

    peaks = measure_peaks()
    model = build(args)
    cfg = model.captioner.config
    C, Q = args.candidates, args.queries
    feats = torch.rand(C, cfg.num_frames, cfg.grid_cells, cfg.input_dim, generator=torch.Generator().manual_seed(0))
    captions = [f"{CAPTION} {i}" for i in range(C)]
    queries = [f"{QUERY} {j}" for j in range(Q)] * C
    shared = torch.arange(C).repeat_interleave(Q)
    params = sum(
        p.numel() for n, p in model.captioner.base_lm.named_parameters() if "embed" not in n and "lora_" not in n
    )
    prefix = model.prefixes(feats[:1], captions[:1])[0].shape[1]
    suffix = model.query_ids(queries[:1])[0].shape[1]
    rows = {}
    with torch.no_grad():
        cases = {
            "prefix reuse": (lambda: model.score_pairs(feats, captions, queries, shared), C * prefix + C * Q * suffix),
            "per pair": (
                lambda: model.score_pairs(feats[shared], [captions[i] for i in shared], queries, torch.arange(C * Q)),
                C * Q * (prefix + suffix),
            ),
        }
        for name, (fn, tokens) in cases.items():
            out = fn()  # warm-up, and the scores compared below
            rows[name] = (median_seconds(fn, args.repeats), tokens, out)
    prec = resolve(args.precision)
    print(describe(peaks))
    print(f"{C} candidates x {Q} queries = {C * Q} pairs; prefix {prefix} tokens, query + prompt {suffix}; {prec}")
    print(f"{'path':<14}{'pairs/s':>10}{'GFLOP/s':>10}{'of peak':>9}")
    for name, (sec, tokens, _) in rows.items():
        gflops = 2 * params * tokens / sec / 1e9
        print(f"{name:<14}{C * Q / sec:>10.1f}{gflops:>10.1f}{share(gflops, prec, peaks):>9.1%}")
    ratio = rows["per pair"][0] / rows["prefix reuse"][0]
    diff = (rows["prefix reuse"][2] - rows["per pair"][2]).abs().max().item()
    print(f"prefix reuse speed-up: {ratio:.2f}x; largest score difference {diff:.2e}")


if __name__ == "__main__":
    main()
