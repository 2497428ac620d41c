"""Reranker vs its first stage, arm by arm, on a finished run (a measurement, not a speed benchmark).

    python benchmarks/reranker_rows.py --run runs/default-s0 --reranker RERANKER/model [--k 8]
                                       [--arms reference,sft,dg_dpo] [--first-stage role] [--out rows.json]

For each caption arm: t2v R@1, v2t R@1 and twin accuracy of the first-stage bi-encoder alone and
of the two-stage ranking (its top k re-ordered by the reranker, `caredpo.rerank.evaluate`), side
by side, with the pairs scored and the seconds they took. `caredpo eval --run` gives the same
two-stage rows for every arm once RUN/reranker/<name>/model exists (at the k it was trained with).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--reranker", type=Path, required=True)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--arms", default="reference,sft,dg_dpo")
    ap.add_argument("--first-stage", default="role")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from caredpo.data import load_dataset
    from caredpo.features import FeatureStore
    from caredpo.pipeline.layout import RunLayout
    from caredpo.pipeline.report import arm_captions, run_seed
    from caredpo.rerank.evaluate import evaluate_reranked
    from caredpo.rerank.model import Reranker
    from caredpo.retrieval.model import Retriever
    from caredpo.retrieval.score import evaluate

    layout = RunLayout.load(args.run)
    ds, store = load_dataset(layout.data), FeatureStore.load(layout.features)
    reranker = Reranker.from_pretrained(args.reranker).eval()
    first = Retriever.from_pretrained(layout.retriever_model(args.first_stage)).eval()
    rows = {}
    print(
        f"{'arm':<11}{'first R@1':>10}{'reranked':>10}{'first v2t':>10}{'reranked':>10}{'first twin':>11}{'reranked':>10}{'pairs':>7}{'s':>7}"
    )
    for arm in args.arms.split(","):
        caps = arm_captions(layout, arm, ds, run_seed(layout))
        t = time.perf_counter()
        two = evaluate_reranked(reranker, first, ds, store, caps, "test", None, args.k)
        seconds = time.perf_counter() - t
        one = evaluate(first, ds, store, caps, "test")
        rows[arm] = {"first_stage": one, "reranked": two, "seconds": seconds}
        print(
            f"{arm:<11}{one['t2v']['R1']:>10.1f}{two['t2v']['R1']:>10.1f}{one['v2t']['R1']:>10.1f}"
            f"{two['v2t']['R1']:>10.1f}{one['twin_acc']:>11.1f}{two['twin_acc']:>10.1f}{two['pairs_scored']:>7}{seconds:>7.0f}"
        )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
