"""Our DPO trainer vs trl's DPOTrainer: same LM, same text-only prompt/chosen/rejected pairs.

    python benchmarks/dpo_vs_trl.py [--lm smollm2|random|tiny] [--steps 6] [--batch 8] [--precision bf16|fp32]

Each arm runs in its own subprocess (clean peak RSS), full fine-tune, AdamW, same lr, beta, batch
size, threads and precision: fp32, or bf16 autocast over fp32 weights (ours: caredpo.precision, as
the captioner's `precision`; trl: its own `DPOConfig(bf16=True)`, accelerate's CPU autocast):
  ours   caredpo.dpo.train (mode "dpo") on a text policy; reference log-probs precomputed once
         (their cost is timed and printed apart); only the policy is resident. The text policy does
         what the video captioner does: one prompt pass per distinct prompt, shared by chosen and
         rejected through the KV cache, and the LM head on completion positions only.
  trl    trl.DPOTrainer with its reference model (a second resident copy), trl's default.
  trl-pc trl.DPOTrainer with precompute_ref_log_probs=True (its precompute pass is not timed).
Throughput = median pairs/s over the steps after warm-up; memory = peak RSS of the process.
FLOP/s counts 2N per forward token and 6N per trained token (N = parameters used on it), against
the matmul peak of the run's precision, measured at --threads before the arms start (peak.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time

WORDS = (
    "red green blue circle square moves left right slowly quickly over grass sand the a and then "
    "turns small large object video scene bounces grows"
).split()


def make_pairs(tok, n: int, prompt_tokens: int, seed: int = 0) -> list[dict]:
    """Prompts of exactly `prompt_tokens` tokens (one token a word); completions of 12-24 words."""
    words = [w for w in WORDS if len(tok(" " + w).input_ids) == 1]
    head = "Describe the video:"
    n_head = len(tok(head).input_ids)
    rng = random.Random(seed)
    sent = lambda k: " " + " ".join(rng.choice(words) for _ in range(k))  # noqa: E731
    return [
        {
            "prompt": head + sent(prompt_tokens - n_head),
            "chosen": sent(rng.randint(12, 24)),
            "rejected": sent(rng.randint(12, 24)),
        }
        for _ in range(n)
    ]


def split_like_trl(tok, pair: dict) -> tuple[list[int], list[int], list[int]]:
    """prompt / chosen / rejected ids exactly as trl 1.16 tokenizes a non-conversational pair."""
    p = tok(pair["prompt"]).input_ids
    c = tok(pair["prompt"] + pair["chosen"] + tok.eos_token).input_ids
    r = tok(pair["prompt"] + pair["rejected"] + tok.eos_token).input_ids
    n = min(_common(p, c), _common(p, r))
    return p[:n], c[n:], r[n:]


def _common(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def load(lm: str):
    import torch

    from caredpo.captioner.lm import load_lm

    if lm == "random":  # fallback: a mid-size random Llama with SmolLM2's shape, tiny tokenizer
        from caredpo.captioner.lm import build_tiny_lm, build_tiny_tokenizer

        tok = build_tiny_tokenizer()
        return build_tiny_lm(tok, hidden=576, layers=12, heads=9), tok
    model, tok = load_lm(lm)
    return model.to(torch.float32), tok


# ---------------------------------------------------------------- our arm


def text_policy_cls():
    import torch
    from torch import nn

    class TextPolicy(nn.Module):
        """Captioner-protocol adapter for text: `features` are prompt ids [B, P] (equal P)."""

        def __init__(self, lm, tok, completion_ids: dict[str, list[int]], precision: str = "fp32"):
            super().__init__()
            self.lm, self.tok, self.completion_ids, self.precision = lm, tok, completion_ids, precision

        def logprob(self, features, captions):
            from caredpo import precision

            with precision.autocast(self.precision):  # what VideoCaptioner.autocast() does
                return self._logprob(features, captions)

        def _logprob(self, features, captions):
            from transformers import DynamicCache

            uniq, inv = torch.unique(features, dim=0, return_inverse=True)
            cache = DynamicCache(config=self.lm.config)
            out = self.lm.model(input_ids=uniq, past_key_values=cache, use_cache=True)
            cache.batch_select_indices(inv)
            rows = [self.completion_ids[c] for c in captions]
            width = max(map(len, rows))
            ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
            mask = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in rows])
            hidden = out.last_hidden_state[inv, -1:]  # last prompt position predicts token 0
            if width > 1:
                pos = torch.arange(features.shape[1], features.shape[1] + width - 1)[None].expand(len(rows), -1)
                h = self.lm.model(
                    input_ids=ids[:, :-1], past_key_values=cache, use_cache=True, position_ids=pos
                ).last_hidden_state
                hidden = torch.cat([hidden, h], 1)
            lp = self.lm.lm_head(hidden[mask]).float().log_softmax(-1).gather(1, ids[mask][:, None])[:, 0]
            return torch.zeros(ids.shape).index_put((mask.nonzero(as_tuple=True)), lp).sum(1)

    return TextPolicy


def run_ours(args) -> dict:
    import torch

    from caredpo.dpo.config import DPOConfig
    from caredpo.dpo.train import metrics_rows, train_dpo

    model, tok = load(args.lm)
    pairs = make_pairs(tok, args.batch * args.steps, args.prompt_tokens)
    split = [split_like_trl(tok, p) for p in pairs]
    completion_ids = {}
    for p, (_, c, r) in zip(pairs, split):  # captions are keyed by text (the Captioner protocol)
        completion_ids[p["chosen"]], completion_ids[p["rejected"]] = c, r
    prompts = {f"p{i}": torch.tensor(s[0]) for i, s in enumerate(split)}
    policy = text_policy_cls()(model, tok, completion_ids, args.precision)
    feats = lambda ids: torch.stack([prompts[i] for i in ids])  # noqa: E731
    t0 = time.perf_counter()
    rows = precompute_refs(policy, pairs, feats, args.batch)
    ref_time = time.perf_counter() - t0
    cfg = DPOConfig.for_mode(
        "dpo", beta=0.1, lr=args.lr, groups_per_batch=args.batch, max_steps=args.steps, save_every=10**6, grad_clip=1.0
    )
    with tempfile.TemporaryDirectory() as out:
        train_dpo(policy, rows, feats, out, cfg, show_progress=False)
        times = [r["time_s"] for r in metrics_rows(out)]
    return {
        "step_times": times,
        "ref_precompute_pairs_per_s": len(pairs) / ref_time,
        "flops_per_pair": flops_ours(model, split),
    }


def precompute_refs(policy, pairs, feats, batch) -> list[dict]:
    import torch

    rows = []
    with torch.no_grad():
        for s in range(0, len(pairs), batch):
            ids = [f"p{i}" for i in range(s, min(s + batch, len(pairs)))]
            chunk = pairs[s : s + batch]
            caps = [c for p in chunk for c in (p["chosen"], p["rejected"])]
            lp = policy.logprob(feats([i for i in ids for _ in (0, 1)]), caps).view(-1, 2)
            rows += [
                {
                    "video_id": i,
                    "group": None,
                    "captions": [p["chosen"], p["rejected"]],
                    "rewards": [1.0, 0.0],
                    "ref_logps": lp[j].tolist(),
                    "best": 0,
                }
                for j, (i, p) in enumerate(zip(ids, chunk))
            ]
    return rows


# ---------------------------------------------------------------- trl arm


def run_trl(args, precompute: bool) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    model, tok = load(args.lm)
    pairs = make_pairs(tok, args.batch * args.steps, args.prompt_tokens)
    times, t = [], {}

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            t["start"] = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - t["start"])

    with tempfile.TemporaryDirectory() as out:
        cfg = DPOConfig(
            output_dir=out,
            per_device_train_batch_size=args.batch,
            max_steps=args.steps,
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            beta=0.1,
            max_length=None,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            seed=0,
            precompute_ref_log_probs=precompute,
            dataloader_num_workers=0,
            max_grad_norm=1.0,
            bf16=args.precision == "bf16",
        )
        # trl's default reference is a second copy of the model; it would reload it from
        # config.architectures, which the GGUF conversion leaves empty, so we hand it the same copy.
        ref = None if precompute else load(args.lm)[0]
        trainer = DPOTrainer(
            model=model,
            ref_model=ref,
            args=cfg,
            train_dataset=Dataset.from_list(pairs),
            processing_class=tok,
            callbacks=[Timer()],
        )
        trainer.train()
    split = [split_like_trl(tok, p) for p in pairs]
    return {"step_times": times, "flops_per_pair": flops_trl(model, split, with_ref=not precompute)}


# ---------------------------------------------------------------- FLOP estimates


def _sizes(model) -> tuple[int, int]:
    head = model.lm_head.weight.numel()
    body = sum(p.numel() for p in model.model.parameters()) - model.model.embed_tokens.weight.numel()
    return body, head


def flops_ours(model, split) -> float:
    """Prompt once per pair, completions twice; head on completion tokens only; fwd+bwd = 6N."""
    body, head = _sizes(model)
    per = [len(p) * body + (len(c) + len(r)) * (body + head) for p, c, r in split]
    return 6.0 * statistics.mean(per)


def flops_trl(model, split, with_ref: bool) -> float:
    """Two full sequences (prompt + completion) through body and head; +2N/token for the ref."""
    body, head = _sizes(model)
    tokens = statistics.mean(2 * len(p) + len(c) + len(r) for p, c, r in split)
    return (6.0 + (2.0 if with_ref else 0.0)) * tokens * (body + head)


# ---------------------------------------------------------------- driver


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    res = run_ours(args) if args.arm == "ours" else run_trl(args, precompute=args.arm == "trl-pc")
    steady = res["step_times"][args.warmup :]
    res["pairs_per_s"] = statistics.median(args.batch / s for s in steady)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["gflops"] = res["flops_per_pair"] * res["pairs_per_s"] / 1e9
    print("RESULT " + json.dumps(res))


def parent(args) -> None:
    from peak import measure_peaks

    peaks = measure_peaks(threads=args.threads)  # the arms' thread count, before they load anything
    results = {}
    for arm in args.arms.split(","):
        cmd = [sys.executable, __file__, "--arm", arm] + [
            f"--{k}={v}"
            for k, v in (
                ("lm", args.lm),
                ("steps", args.steps),
                ("batch", args.batch),
                ("warmup", args.warmup),
                ("threads", args.threads),
                ("prompt-tokens", args.prompt_tokens),
                ("lr", args.lr),
                ("precision", args.precision),
            )
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"{arm} failed:\n{proc.stderr[-3000:]}")
        results[arm] = json.loads(line[-1][7:]) | {"wall_s": time.perf_counter() - t0}
        print(f"{arm}: {json.dumps(results[arm])}", file=sys.stderr, flush=True)
    report(args, results, peaks)


def report(args, results: dict, peaks: dict[str, float]) -> None:
    from peak import describe, share

    ours = results.get("ours")
    print(
        f"\nDPO trainer vs trl {_trl_version()} | LM {args.lm}, full fine-tune {args.precision}, {args.batch} "
        f"pairs/step, {args.steps} steps ({args.warmup} warm-up), {args.threads} threads, prompt "
        f"{args.prompt_tokens} tokens\n{describe(peaks)}; % peak against the {args.precision} one"
    )
    print(f"{'arm':<8} {'pairs/s':>8} {'x ours':>7} {'peak RSS MB':>12} {'GFLOP/s':>8} {'% peak':>7} {'wall s':>7}")
    for arm, r in results.items():
        ratio = ours["pairs_per_s"] / r["pairs_per_s"] if ours else float("nan")
        print(
            f"{arm:<8} {r['pairs_per_s']:>8.2f} {ratio:>7.2f} {r['peak_rss_mb']:>12.0f} {r['gflops']:>8.1f} "
            f"{100 * share(r['gflops'], args.precision, peaks):>6.0f}% {r['wall_s']:>7.1f}"
        )
    if ours:
        print(
            f"ours: reference log-probs precomputed once at {ours['ref_precompute_pairs_per_s']:.1f} pairs/s "
            "(not in the step times; trl's default pays a reference forward every step)"
        )
        for arm in (a for a in results if a != "ours"):
            r = results[arm]
            print(
                f"ours vs {arm}: throughput x{ours['pairs_per_s'] / r['pairs_per_s']:.2f}, "
                f"peak memory x{ours['peak_rss_mb'] / r['peak_rss_mb']:.2f}"
            )


def _trl_version() -> str:
    from importlib.metadata import version

    return version("trl")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arm", choices=["ours", "trl", "trl-pc"], help="(internal) run one arm and print RESULT")
    ap.add_argument("--arms", default="ours,trl", help="comma list of ours, trl, trl-pc")
    ap.add_argument(
        "--lm",
        default="smollm2",
        help="smollm2 | random (mid-size random Llama) | tiny (seconds: a check) | local folder",
    )
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="bf16",
        help="both arms: bf16 autocast over fp32 weights, or plain fp32",
    )
    args = ap.parse_args()
    child(args) if args.arm else parent(args)


if __name__ == "__main__":
    main()
