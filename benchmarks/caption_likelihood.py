"""Caption likelihood across twins: does each captioner's likelihood tell a test clip from its twins?

    python benchmarks/caption_likelihood.py RUN [CAPTIONER_DIR ...] [--threads 2]

For every test clip's specific sentences s, log pi(s | u) under each clip u of its twin group
(`caredpo.captioner.grounding`): the share where the own clip is the strict argmax (chance 25% in
TwinClips groups of 4) and the median margin over the best twin. Rows: the run's sft, dpo and dg_dpo
captioners, then any extra captioner folders (e.g. a `caredpo dpo` run trained another way). No
retriever and no decoding is involved: it reads whether an update reached held-out clips.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def main() -> None:
    from caredpo.captioner.grounding import grounded_share, own_margins, twin_logprobs
    from caredpo.captioner.model import VideoCaptioner
    from caredpo.data import load_dataset
    from caredpo.features import FeatureStore

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("captioners", type=Path, nargs="*")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ds, store = load_dataset(args.run / "data"), FeatureStore.load(args.run / "data" / "features")
    models = [args.run / "captioner" / arm / "model" for arm in ("sft", "dpo", "dg_dpo")] + args.captioners
    print("| captioner | own clip most likely % | median margin (nats) | sentences | seconds |\n|---|---|---|---|---|")
    for path in models:
        t = time.perf_counter()
        logps, own = twin_logprobs(VideoCaptioner.from_pretrained(path).eval(), ds, store.grid_feats)
        margin, share = own_margins(logps, own).median(), grounded_share(logps, own)
        print(f"| {path} | {share:.1f} | {margin:+.3f} | {len(own)} | {time.perf_counter() - t:.0f} |", flush=True)


if __name__ == "__main__":
    main()
