"""fp32 vs bf16 side by side in one run: the captioner's and the retriever's hot paths.

    python benchmarks/precision.py [--lm smollm2|tiny] [--text-encoder minilm|tiny] [--threads 2]
                                   [--repeats 3] [--data RUN/data]

bf16 = autocast (caredpo.precision, the models' `precision` field), the captioner's frozen base
Linears stored in bf16 (`precision.store_frozen_linears_in_bf16`); the captioner cases add
bf16-cast, the same autocast over fp32 frozen weights, which autocast casts again at every call
(how bf16 ran before the stored copies; the same numbers bit for bit). Each model is built once per
precision from the same seed, and each case runs its precisions back to back on the same inputs,
so a change in the machine's load hits them alike:
  sft step   VideoCaptioner.nll on 4 videos x 2 captions, backward, AdamW step
  dpo step   caredpo.dpo.batch.batch_loss (DG-DPO) on one hand-made twin group (4 videos, K=4
             captions, the 3 twins as negatives), backward, AdamW step
  generate   VideoCaptioner.generate on 4 videos, n=4, top-p 0.9, 24 new tokens at most
  logprob    VideoCaptioner.logprob on 8 videos x 4 captions, no grad
  retriever  caredpo.retrieval.train.train_step (make_optimizer) on 16 (query, video + caption) pairs
Inputs: the features and sentences of --data RUN/data, or random features of the right shapes
(grid [B, 8, 4, 1280 + 64], global [B, 8, 1280]). Median of --repeats after one warm-up.
GFLOP/s estimate: 2 x params x tokens (LM body on every token it runs, LM head on the tokens it
predicts; the encoder's layers on padded tokens), x3 for a training step (an upper bound where
base weights are frozen: their backward computes input gradients only). "of peak" is against the
matmul peak of the row's precision, measured at --threads at the start (benchmarks/peak.py).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from peak import describe, measure_peaks, median_seconds, share

PRECISIONS = ("fp32", "bf16")
CAPTIONER_PRECISIONS = ("fp32", "bf16-cast", "bf16")
CAPTIONS = [
    "a small red circle slides from left to right over the grass and turns blue halfway",
    "a blue square moves down on sand",
    "a video of a green star on a wooden table",
    "over the snow, an orange cross moves diagonally up to the left and grows for a moment",
]
N_VIDEOS = 16  # the most any case uses (the retriever batch)


@dataclass
class Inputs:
    ids: list[str]
    grid: torch.Tensor  # [N, T, 4, 1280 + colour bins] captioner input
    glob: torch.Tensor  # [N, T, 1280] retriever input
    captions: dict[str, list[str]]  # video id -> 4 sentences


def load_inputs(data: Path | None, n: int = N_VIDEOS) -> Inputs:
    """n videos from RUN/data (features/ and sentences), or random stand-ins of the same shapes."""
    if data is None:
        g = torch.Generator().manual_seed(0)
        ids = [f"v{i:02d}" for i in range(n)]
        grid = torch.rand(n, 8, 4, 1280 + 64, generator=g) * 3  # non-negative, like CNN activations
        glob = torch.rand(n, 8, 1280, generator=g) * 3
        caps = {v: [CAPTIONS[(i + j) % len(CAPTIONS)] for j in range(4)] for i, v in enumerate(ids)}
        return Inputs(ids, grid, glob, caps)
    from caredpo.data import load_dataset
    from caredpo.features import FeatureStore

    ds, store = load_dataset(data), FeatureStore.load(data / "features")
    by_video = defaultdict(list)
    for s in ds.sentences:
        by_video[s.video_id].append(s.text)
    ids = [v.id for v in ds.videos if v.id in store and len(by_video[v.id]) >= 4][:n]
    if len(ids) < n:
        raise SystemExit(f"{data}: need {n} videos with features and >= 4 sentences, found {len(ids)}")
    return Inputs(ids, store.grid_feats(ids), store.global_feats(ids), {v: by_video[v][:4] for v in ids})


def measure(fn, repeats: int) -> float:
    """Median seconds of fn() over repeats, after one warm-up call."""
    fn()
    return median_seconds(fn, repeats)


# ---------------------------------------------------------------- captioner cases


def build_captioner(lm: str, prec: str, grid: torch.Tensor):
    """The default preset's captioner (or the smoke one's for lm="tiny") for grid [N, T, 4, C]."""
    from dataclasses import replace

    from caredpo.captioner.model import CaptionerConfig, VideoCaptioner

    cast, prec = prec == "bf16-cast", "fp32" if prec == "bf16-cast" else prec
    # colour bins from the features (64 in the presets); T < 8 only in smoke runs' features
    shape = dict(num_frames=min(8, grid.shape[1]), colour_bins=grid.shape[-1] - 1280)
    if lm == "tiny":  # like the smoke preset: a random 2-layer Llama, a small projector
        cfg = CaptionerConfig(lm="tiny", **shape, projector_hidden=64, lora_layers=-1, lora_rank=4, precision=prec)
    else:
        cfg = CaptionerConfig(lm=lm, **shape, lora_layers=-1, precision=prec)
    model = VideoCaptioner(cfg)
    if cast:  # fp32 storage, then the bf16 autocast: frozen weights cast at every call
        model.config = replace(cfg, precision="bf16")
    model.set_trainable()
    return model


def lm_sizes(model) -> tuple[int, int]:
    """(LM body params without embeddings and LoRA, LM head params)."""
    head = model.lm_head.weight.numel()
    total = sum(p.numel() for n, p in model.base_lm.named_parameters() if "lora_" not in n)
    tied = model.lm_head.weight is model.embed.weight
    return total - (head if tied else 2 * head), head


def caption_tokens(model, captions: list[str]) -> int:
    return sum(len(model.tokenizer(c, add_special_tokens=False).input_ids) + 1 for c in captions)  # + EOS


def lm_flops(model, videos: int, captions: list[str], factor: int) -> float:
    """2 x params x tokens: body on each distinct video's prefix and every caption token, head on
    caption tokens; factor 3 for a training step."""
    body, head = lm_sizes(model)
    prefix = model.head_ids.numel() + model.config.num_visual_tokens + model.tail_ids.numel()
    cap = caption_tokens(model, captions)
    return factor * 2.0 * (body * (videos * prefix + cap) + head * cap)


def training(model, opt, loss_fn):
    def step():
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()

    return step


def sft_case(model, x: Inputs):
    """4 videos x 2 captions: features repeated per caption [8, T, 4, C]."""
    ids = x.ids[:4]
    feats = x.grid[:4].repeat_interleave(2, 0)
    caps = [c for v in ids for c in x.captions[v][:2]]
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-5)
    return training(model, opt, lambda: model.nll(feats, caps)), len(caps), "capt/s", lm_flops(model, 4, caps, 3)


def dpo_rows(x: Inputs) -> list[dict]:
    """One twin group of 4 videos: K=4 captions with distinct rewards (every pair used), the other
    3 videos as negatives; reference log-probs are made up (their values do not change the cost)."""
    ids = x.ids[:4]
    return [
        {
            "video_id": v,
            "group": "g0",
            "captions": x.captions[v],
            "rewards": [0.1, 0.4, 0.2, 0.3],
            "ref_logps": [-30.0, -28.0, -31.0, -29.0],
            "best": 1,
            "negatives": [u for u in ids if u != v],
            "ref_cross_logps": [-33.0, -34.0, -35.0],
        }
        for v in ids
    ]


def dpo_case(model, x: Inputs):
    from caredpo.dpo.batch import batch_loss
    from caredpo.dpo.config import DPOConfig

    rows, cfg = dpo_rows(x), DPOConfig.for_mode("dg-dpo", lr=1e-5)
    index = {v: i for i, v in enumerate(x.ids)}
    features = lambda ids: x.grid[[index[v] for v in ids]]  # noqa: E731  [len(ids), T, 4, C]
    scored = [c for r in rows for c in r["captions"]] + [r["captions"][r["best"]] for r in rows for _ in r["negatives"]]
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=cfg.lr)
    step = training(model, opt, lambda: batch_loss(model, rows, features, cfg)[0])
    return step, len(scored), "seq/s", lm_flops(model, len(rows), scored, 3)


def generate_case(model, x: Inputs, max_new: int = 24):
    """4 videos, n=4 each: items = generated tokens (EOS included), counted from one extra run."""
    feats = x.grid[:4]
    kw = dict(n=4, temperature=1.0, top_p=0.9, max_new_tokens=max_new, seed=0)
    ids = model.eval().generate_ids(feats, **kw)  # same seed -> the tokens the timed calls produce
    ended = ids == model.eos_id
    tokens = int(torch.where(ended.any(1), ended.float().argmax(1) + 1, ids.shape[1]).sum())
    body, head = lm_sizes(model)
    prefix = model.head_ids.numel() + model.config.num_visual_tokens + model.tail_ids.numel()
    flops = 2.0 * (body * (len(feats) * prefix + tokens) + head * tokens)
    return lambda: model.eval().generate(feats, **kw), tokens, "tok/s", flops


def logprob_case(model, x: Inputs):
    feats = x.grid[:8].repeat_interleave(4, 0)  # [32, T, 4, C]
    caps = [c for v in x.ids[:8] for c in x.captions[v]]

    def run():
        with torch.no_grad():
            model.eval().logprob(feats, caps)

    return run, len(caps), "seq/s", lm_flops(model, 8, caps, 1)


# ---------------------------------------------------------------- retriever case


def retriever_case(encoder: str, prec: str, x: Inputs):
    """16 pairs: query = a video's first sentence, candidate = its features + its second sentence."""
    from caredpo.retrieval.model import Retriever, RetrieverConfig
    from caredpo.retrieval.train import RetrieverTrainConfig, make_optimizer, make_schedule, train_step

    cfg = RetrieverTrainConfig(model=RetrieverConfig(text_encoder=encoder, precision=prec))
    model = Retriever(cfg.model)
    opt = make_optimizer(model, cfg)
    sched = make_schedule(opt, cfg)
    queries = [x.captions[v][0] for v in x.ids]
    captions = [x.captions[v][1] for v in x.ids]
    steps = iter(range(10**9))
    run = lambda: train_step(model, opt, sched, cfg, queries, x.glob, captions, next(steps))  # noqa: E731
    return run, len(queries), "pairs/s", retriever_flops(model, queries, captions)


def retriever_flops(model, queries: list[str], captions: list[str]) -> float:
    """2 x encoder-layer params x padded tokens x3: queries [B, Lq]; candidates [CLS] video [SEP]
    + the caption without its [CLS] [B, 3 + Lc - 1] (mean pooling: one video token)."""
    tok, cfg = model.tokenizer, model.config
    lq = tok(queries, padding=True, truncation=True, max_length=cfg.max_query_tokens)["input_ids"]
    lc = tok(captions, padding=True, truncation=True, max_length=cfg.max_caption_tokens)["input_ids"]
    tokens = len(queries) * (len(lq[0]) + 2 + len(lc[0]))
    layers = sum(p.numel() for p in model.encoder.encoder.parameters())
    return 3 * 2.0 * layers * tokens


# ---------------------------------------------------------------- driver

CAPTIONER_CASES = {"sft step": sft_case, "dpo step": dpo_case, "generate (n=4)": generate_case, "logprob": logprob_case}


def run_cases(args, x: Inputs) -> list[dict]:
    rows = []
    models = {p: build_captioner(args.lm, p, x.grid) for p in CAPTIONER_PRECISIONS}  # same seed, same init
    for case, make in CAPTIONER_CASES.items():
        for p in CAPTIONER_PRECISIONS:
            rows.append(timed(case, p, *make(models[p], x), args.repeats))
    del models
    for p in PRECISIONS:
        rows.append(timed("retriever step", p, *retriever_case(args.text_encoder, p, x), args.repeats))
    return rows


def timed(case: str, prec: str, fn, items: int, unit: str, flops: float, repeats: int) -> dict:
    torch.manual_seed(0)
    s = measure(fn, repeats)
    row = {"case": case, "prec": prec, "s": s, "rate": items / s, "unit": unit, "gflops": flops / s / 1e9}
    print(f"  measured: {case:16} {prec:9} {s:8.3f} s", flush=True)
    return row


def print_table(rows: list[dict], peaks: dict[str, float]) -> dict[str, float]:
    """The table; returns {case: fp32 seconds / bf16 seconds}."""
    fp32 = {r["case"]: r["s"] for r in rows if r["prec"] == "fp32"}
    print(f"\n{'case':16} {'prec':9} {'median s':>9} {'rate':>18} {'GFLOP/s':>8} {'of peak':>8} {'vs fp32':>7}")
    for r in rows:
        up = f"{fp32[r['case']] / r['s']:.2f}x" if r["prec"] != "fp32" else ""
        peak = "fp32" if r["prec"] == "fp32" else "bf16"
        print(
            f"{r['case']:16} {r['prec']:9} {r['s']:9.3f} {r['rate']:>10.1f} {r['unit']:<7} {r['gflops']:8.1f} "
            f"{share(r['gflops'], peak, peaks):8.0%} {up:>7}"
        )
    return {r["case"]: fp32[r["case"]] / r["s"] for r in rows if r["prec"] == "bf16"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lm", default="smollm2", help="captioner LM: smollm2 or tiny (a check in seconds)")
    ap.add_argument("--text-encoder", default="minilm", help="retriever encoder: minilm or tiny")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data", type=Path, help="RUN/data: its features and sentences (default: random features)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    peaks = measure_peaks()  # at --threads
    from caredpo.precision import cpu_has_bf16

    x = load_inputs(args.data)
    print(
        f"threads={args.threads} lm={args.lm} text encoder={args.text_encoder} inputs={args.data or 'random'} "
        f"native bf16 CPU={cpu_has_bf16()}; {describe(peaks)}; median of {args.repeats}",
        flush=True,
    )
    speedup = print_table(run_cases(args, x), peaks)
    print(f"bf16 speed-up on an SFT step: {speedup['sft step']:.2f}x")


if __name__ == "__main__":
    main()
