"""Mean ± std over seed runs, as the README's and docs/results.md's three-seed tables print them.

    python benchmarks/seeds_report.py runs/default-s0 runs/default-s1 runs/default-s2

Prints markdown: the results table and the caption-factor table (mean ± sample std; `caredpo
summary` prints the same numbers), the role retriever's per-seed R@1 and twin accuracy, the
preference stage's diagnostics per factor (RUN/stages/prefs.json; runs from before every factor
was reported print '-'), both DPO arms' first-pass accuracies (held out: docs/design.md, "DG-DPO:
our reconstruction"; '-' for runs from before they were kept) and, where each run folder holds a
`reworded.json` (`caredpo eval --run RUN --queries Q.json --out RUN/reworded.json`), the reworded
queries' rows. Ends with each run's total stage seconds and peak RSS.
"""

from __future__ import annotations

import json
import statistics as st
import sys
from pathlib import Path


def ms(vals) -> str:
    return f"{st.fmean(vals):.1f} ± {st.stdev(vals) if len(vals) > 1 else 0:.1f}"


def main(argv: list[str]) -> None:
    runs = [Path(p) for p in argv]
    R = [json.loads((r / "results.json").read_text()) for r in runs]
    print("| captions | retriever | t2v R@1 | t2v R@5 | v2t R@1 | twin acc % |\n|---|---|---|---|---|---|")
    for arm, rows in R[0]["arms"].items():
        for n in rows:
            g = lambda f, arm=arm, n=n: [f(r["arms"][arm][n]) for r in R]
            print(
                f"| {arm} | {n} | {ms(g(lambda m: m['t2v']['R1']))} | {ms(g(lambda m: m['t2v']['R5']))} | {ms(g(lambda m: m['v2t']['R1']))} | {ms(g(lambda m: m['twin_acc']))} |"
            )
    facs = ["colour", "shape", "size", "background", "motion", "direction", "events"]
    print("\n| captions | " + " | ".join(facs) + " |\n|---|" + "---|" * len(facs))
    for arm in R[0]["caption_factors"]:
        print(f"| {arm} | " + " | ".join(ms([r["caption_factors"][arm][f] for r in R]) for f in facs) + " |")
    print(
        "\nper seed t2v R@1 role: "
        + "; ".join(
            f"seed {r['meta']['seed']}: "
            + ", ".join(
                f"{a} {r['arms'][a]['role' if a not in ('no_caption',) else 'no_caption']['t2v']['R1']:.1f}"
                for a in ("no_caption", "sft", "dpo", "dg_dpo")
            )
            for r in R
        )
    )
    print(
        "per seed twin role: "
        + "; ".join(
            f"seed {r['meta']['seed']}: "
            + ", ".join(
                f"{a} {r['arms'][a]['role' if a not in ('no_caption',) else 'no_caption']['twin_acc']:.1f}"
                for a in ("no_caption", "sft", "dpo", "dg_dpo", "reference")
            )
            for r in R
        )
    )
    P = [json.loads((r / "stages" / "prefs.json").read_text()) for r in runs]
    print("\n| reward (prefs.json), % | " + " | ".join(facs) + " |\n|---|" + "---|" * len(facs))
    for stat in ("any_right", "best_right", "pair_acc"):
        cell = lambda f, stat=stat: ms([p[f"{f}_{stat}"] * 100 for p in P]) if f"{f}_{stat}" in P[0] else "-"
        print(f"| {stat} | " + " | ".join(cell(f) for f in facs) + " |")
    print(
        "\n| DPO arm, first pass (groups new to the policy) | caption pairs ordered right | video group |\n|---|---|---|"
    )
    for arm in ("dpo", "dg_dpo"):
        first = [_first_pass(r / "captioner" / arm / "metrics.json") for r in runs]
        cell = lambda k, first=first: "-" if None in first else ms([f[k] for f in first])
        print(f"| {arm} | {cell('reward_acc')} | {cell('video_acc')} |")
    rw = [r / "reworded.json" for r in runs]
    if all(p.exists() for p in rw):
        W = [json.loads(p.read_text())["arms"] for p in rw]
        print("\nreworded queries (t2v R@1 / twin):")
        for arm, rows in W[0].items():
            for n in rows:
                print(
                    f"| {arm} | {n} | {ms([w[arm][n]['t2v']['R1'] for w in W])} | {ms([w[arm][n]['twin_acc'] for w in W])} |"
                )
    print(
        "\nstage seconds:", [r["meta"]["total_stage_seconds"] for r in R], "rss", [r["meta"]["peak_rss_mb"] for r in R]
    )


def _first_pass(metrics: Path) -> dict | None:
    """A DPO arm's first-pass stats (metrics.json `passes`); None for runs from before they were kept."""
    passes = json.loads(metrics.read_text()).get("passes") if metrics.exists() else None
    return passes[0] if passes else None


if __name__ == "__main__":
    main(sys.argv[1:])
