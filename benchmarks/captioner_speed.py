"""Captioner speed: our paths vs plain Hugging Face on the same model and inputs, side by side.

    python benchmarks/captioner_speed.py [--model RUN_OR_CAPTIONER_DIR] [--lm tiny] [--threads 2]
                                         [--precision fp32|bf16|auto]

Rows (medians over --repeats):
  sft step      ours: each video's prefix once, its KV cache shared by its captions, LM head only at
                caption positions  vs  plain: every caption with its own full prefix, HF `labels` loss
  generate      ours: prefix once per video, cache repeated n times, finished rows dropped
                vs  HF `generate(inputs_embeds=..., num_return_sequences=n)`; same top-p, same max length
  decode batch  the preference stage's `units_per_call`: U twin groups (4 videos x n each) in one
                generate call  vs  one call per group (the same uniforms: `sampling.stream_uniforms`)
  logprob       ours (shared prefix, head at caption positions)  vs  one forward with full logits
Peak memory: growth of the process's peak RSS during the case (VmHWM reset before each case).
GFLOP/s counts 2 x params x tokens (+ LM head where it is applied); x2 for a training step (backward
through frozen weights computes input gradients only). Both paths run at the captioner's precision
(--precision, else its config's; the plain peers under the same autocast). "of peak" sets each row
against the fp32 or bf16 matmul peak measured at the start of the run at --threads (benchmarks/peak.py).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from peak import describe, measure_peaks, share

CAPTIONS = [
    "a small red circle slides from left to right over the grass and turns blue halfway",
    "a blue square moves down on sand",
    "a video of a green star on a wooden table",
    "over the snow, an orange cross moves diagonally up to the left and grows for a moment",
]


def rss_peak_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1])
    return 0


def measure(fn, repeats: int) -> tuple[float, float, object]:
    """(median seconds, peak RSS growth in MiB, last result); one warm-up call first."""
    out = fn()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base, times = rss_peak_kb(), []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), (rss_peak_kb() - base) / 1024, out


def param_counts(model) -> tuple[int, int]:
    """(non-embedding LM params, LM head params)."""
    head = model.lm_head.weight.numel()
    total = sum(p.numel() for n, p in model.base_lm.named_parameters() if "lora_" not in n)
    tied = model.lm_head.weight is model.embed.weight
    return total - (head if tied else 2 * head), head


def batch(model, videos: int, per_video: int, seed: int = 0):
    feats = torch.rand(videos, 8, 4, model.config.input_dim, generator=torch.Generator().manual_seed(seed)) * 3
    rep = feats.repeat_interleave(per_video, 0)
    caps = [CAPTIONS[i % len(CAPTIONS)] for i in range(videos * per_video)]
    return feats, rep, caps


# ------------------------------------------------------------------ plain HF peers


def plain_inputs(model, rep, caps):
    """Full sequences [prefix + caption + eos], right-padded, labels -100 outside the caption."""
    ids, mask = model.encode_captions(caps)
    pre = model.prefix_embeds(rep)
    P = pre.shape[1]
    emb = torch.cat([pre, model.embed(ids)], 1)
    labels = torch.full(emb.shape[:2], -100, dtype=torch.long)
    labels[:, P:] = ids.masked_fill(~mask, -100)
    attn = torch.cat([torch.ones(len(caps), P, dtype=torch.long), mask.long()], 1)
    return emb, attn, labels


def plain_loss(model, rep, caps):
    with model.autocast():  # the same precision as our path
        emb, attn, labels = plain_inputs(model, rep, caps)
        return model.lm(inputs_embeds=emb, attention_mask=attn, labels=labels).loss.float()


def plain_logprob(model, rep, caps):
    with model.autocast():
        emb, attn, labels = plain_inputs(model, rep, caps)
        logits = model.lm(inputs_embeds=emb, attention_mask=attn).logits
    logp = logits[:, :-1].float().log_softmax(-1)  # fp32 log-softmax, as ours
    tgt = labels[:, 1:]
    lp = logp.gather(2, tgt.clamp_min(0)[..., None])[..., 0]
    return (lp * (tgt != -100)).sum(1)


def hf_generate(model, feats, n, temperature, top_p, max_new, seed):
    torch.manual_seed(seed)
    with model.autocast():
        pre = model.prefix_embeds(feats)
        return model.base_lm.generate(
            inputs_embeds=pre,
            attention_mask=torch.ones(pre.shape[:2], dtype=torch.long),
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            top_k=0,
            max_new_tokens=max_new,
            num_return_sequences=n,
            eos_token_id=model.eos_id,
            pad_token_id=model.pad_id,
        )


# ------------------------------------------------------------------ cases


def train_step(model, opt, loss_fn):
    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def count_tokens(model, texts: list[str]) -> int:
    return sum(len(model.tokenizer(t, add_special_tokens=False).input_ids) + 1 for t in texts)


def generated_tokens(model, ids: torch.Tensor) -> int:
    """Tokens each row produced, its EOS included (pads after EOS not counted)."""
    is_eos = ids == model.eos_id
    ended = is_eos.any(1)
    lengths = torch.where(ended, is_eos.float().argmax(1) + 1, torch.full_like(ended, ids.shape[1], dtype=torch.long))
    return int(lengths.sum())


class Rows(list):
    """Rows that print themselves as they arrive (a slow case should not hide the others)."""

    def append(self, r: dict) -> None:
        super().append(r)
        print(f"  measured: {r['case']:30} {r['path']:24} {r['s']:8.3f} s  {r['rate']}", flush=True)


def case_rows(model, args) -> list[dict]:
    P_lm, P_head = param_counts(model)
    prefix = model.head_ids.numel() + model.config.num_visual_tokens + model.tail_ids.numel()
    rows = Rows()
    # --- SFT step: V videos x m captions
    V, m = args.sft_videos, args.sft_captions
    feats, rep, caps = batch(model, V, m)
    cap_tok = count_tokens(model, caps)
    model.train()
    model.set_trainable(projector=True, lora=True)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-5)
    fl_ours = 2 * (2 * P_lm * (V * prefix + cap_tok) + 2 * P_head * cap_tok)
    fl_plain = 2 * (2 * P_lm * (V * m * prefix + cap_tok) + 2 * P_head * (V * m * prefix + cap_tok))
    for name, fn, fl in (
        ("ours", lambda: model.nll(rep, caps), fl_ours),
        ("plain HF", lambda: plain_loss(model, rep, caps), fl_plain),
    ):
        t, mem, _ = measure(train_step(model, opt, fn), args.repeats)
        rows.append(
            {
                "case": f"sft step ({V}x{m} captions)",
                "path": name,
                "s": t,
                "mem": mem,
                "rate": f"{V * m / t:.1f} capt/s",
                "per_s": V * m / t,
                "gflops": fl / t / 1e9,
            }
        )
    model.eval()
    # --- generation
    G, n = args.gen_videos, args.gen_n
    feats, _, _ = batch(model, G, 1, seed=1)
    with torch.inference_mode():
        t, mem, out = measure(
            lambda: model.generate_ids(feats, n=n, temperature=1.0, top_p=0.9, max_new_tokens=args.max_new, seed=0),
            args.repeats,
        )
        rows.append(_gen_row(G, n, "ours", t, mem, generated_tokens(model, out), P_lm, P_head, prefix * G))
        t, mem, out = measure(lambda: hf_generate(model, feats, n, 1.0, 0.9, args.max_new, 0), args.repeats)
        rows.append(
            _gen_row(G, n, "plain HF generate", t, mem, generated_tokens(model, out), P_lm, P_head, prefix * G * n)
        )
    decode_batch_rows(rows, model, args, P_lm, P_head, prefix)
    # --- log-probs
    feats, rep, caps = batch(model, args.lp_videos, args.lp_captions, seed=2)
    cap_tok, N = count_tokens(model, caps), len(caps)
    with torch.no_grad():
        for name, fn, fl in (
            (
                "ours",
                lambda: model.logprob(rep, caps),
                2 * P_lm * (args.lp_videos * prefix + cap_tok) + 2 * P_head * cap_tok,
            ),
            (
                "plain HF (full logits)",
                lambda: plain_logprob(model, rep, caps),
                2 * (P_lm + P_head) * (N * prefix + cap_tok),
            ),
        ):
            t, mem, _ = measure(fn, args.repeats)
            rows.append(
                {
                    "case": f"logprob ({N} pairs)",
                    "path": name,
                    "s": t,
                    "mem": mem,
                    "rate": f"{N / t:.1f} pairs/s",
                    "per_s": N / t,
                    "gflops": fl / t / 1e9,
                }
            )
    return rows


@torch.inference_mode()
def decode_batch_rows(rows, model, args, P_lm, P_head, prefix) -> None:
    """U twin groups of 4 videos sampled in one call vs one call per group, as the preference
    stage does with units_per_call U vs 1 (n = --gen-n samples a video, seeded per group)."""
    from caredpo.captioner.sampling import stream_uniforms

    U, n, L = args.units_per_call, args.gen_n, args.max_new
    feats, _, _ = batch(model, 4 * U, 1, seed=3)
    tables = [stream_uniforms(g, 4 * n, L) for g in range(U)]
    kw = dict(n=n, temperature=1.0, top_p=0.95, max_new_tokens=L)
    one = lambda: model.generate_ids(feats, uniforms=torch.cat(tables), **kw)  # noqa: E731
    apart = (
        lambda: torch.cat(  # noqa: E731
            [model.generate_ids(feats[4 * g : 4 * g + 4], uniforms=tables[g], **kw) for g in range(U)]
        )
    )
    for name, fn in (("ours", one), ("one call per group", apart)):
        t, mem, out = measure(fn, args.repeats)
        row = _gen_row(4 * U, n, name, t, mem, generated_tokens(model, out), P_lm, P_head, prefix * 4 * U)
        rows.append({**row, "case": f"decode {U} groups x 4 x n={n}"})


def _gen_row(G, n, name, t, mem, tok, P_lm, P_head, prefill_tokens) -> dict:
    fl = 2 * P_lm * (prefill_tokens + tok) + 2 * P_head * tok
    return {
        "case": f"generate ({G} videos x n={n})",
        "path": name,
        "s": t,
        "mem": mem,
        "rate": f"{tok / t:.0f} tok/s",
        "per_s": tok / t,
        "gflops": fl / t / 1e9,
    }


def print_table(rows: list[dict], prec: str, peaks: dict[str, float]) -> None:
    """All rows ran at `prec` ("fp32" | "bf16"): "of peak" is against that precision's peak."""
    print(
        f"{'case':32} {'path':24} {'prec':>5} {'median s':>9} {'rate':>14} {'GFLOP/s':>8} {'of peak':>8} "
        f"{'peak MiB':>9} {'speed-up':>9}"
    )
    for r in rows:  # speed-up = our rate / the peer's rate (tokens/s for generation)
        peer = [x["per_s"] for x in rows if x["case"] == r["case"] and x["path"] != "ours"]
        ratio = f"{r['per_s'] / peer[0]:.2f}x" if r["path"] == "ours" and peer else ""
        print(
            f"{r['case']:32} {r['path']:24} {prec:>5} {r['s']:9.3f} {r['rate']:>14} {r['gflops']:8.1f} "
            f"{share(r['gflops'], prec, peaks):8.0%} {r['mem']:9.1f} {ratio:>9}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="trained captioner or SFT run folder (default: fresh SmolLM2 captioner)")
    ap.add_argument("--lm", default="smollm2", help="base LM for a fresh captioner: smollm2, tiny or a path")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        help="precision of both paths (default: the captioner's config; fp32 for a fresh one)",
    )
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--sft-videos", type=int, default=4)
    ap.add_argument("--sft-captions", type=int, default=4)
    ap.add_argument("--gen-videos", type=int, default=8)
    ap.add_argument("--gen-n", type=int, default=4)
    ap.add_argument("--max-new", type=int, default=24)
    ap.add_argument("--units-per-call", type=int, default=4, help="twin groups a call in the decode-batch case")
    ap.add_argument("--lp-videos", type=int, default=8)
    ap.add_argument("--lp-captions", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import dataclasses

    from caredpo import precision
    from caredpo.captioner.model import CaptionerConfig, VideoCaptioner

    peaks = measure_peaks()  # at --threads, before the model takes memory
    model = VideoCaptioner.from_pretrained(args.model) if args.model else VideoCaptioner(CaptionerConfig(lm=args.lm))
    if args.precision:  # the model reads config.precision at every pass (model.autocast)
        model.config = dataclasses.replace(model.config, precision=args.precision)
    prec = precision.resolve(model.config.precision, model.device)
    print(
        f"threads={args.threads} lm={model.config.lm} lora_layers={model.config.lora_layers} "
        f"visual tokens={model.config.num_visual_tokens} precision={prec}; {describe(peaks)}"
    )
    print_table(case_rows(model, args), prec, peaks)


if __name__ == "__main__":
    main()
