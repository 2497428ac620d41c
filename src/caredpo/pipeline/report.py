"""Evaluate every caption arm of a finished run and report it: table, JSON, plots, examples.

results["arms"][arm][retriever] = {"t2v": {...}, "v2t": {...}, "twin_acc": ...}
  arm        in CAPTION_ARMS (no_caption, sft, dpo, dg_dpo, reference)
  retriever  in ARM_RETRIEVERS[arm] (role / no_role; *_seq = video_pooling "sequence"), then, in a run
             with rerankers, ARM_RERANKERS[arm] (the two-stage ranking: presets.RERANKERS)
results["caption_factors"][arm] = {"n", "colour", "shape", ...}: % of the arm's test captions that
  state each clip factor right (`caredpo.captioner.factors`; empty for data without factors)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from ..io import read_json, write_json
from ..records import Dataset
from .layout import RunLayout
from .presets import CAPTION_ARMS, RERANKERS

# caption arm -> the retrievers it is evaluated with (the no-caption arm has its own retrievers)
ARM_RETRIEVERS: dict[str, tuple[str, ...]] = {
    "no_caption": ("no_caption", "no_caption_seq"),
    "sft": ("role", "no_role"),
    "dpo": ("role", "no_role"),
    "dg_dpo": ("role", "no_role", "role_seq"),
    "reference": ("role", "no_role"),
}

# caption arm -> the rerankers that re-order its first stage (rows only where the run trained them)
ARM_RERANKERS: dict[str, tuple[str, ...]] = {
    arm: ("rerank_no_caption",) if arm == "no_caption" else ("rerank_role", "rerank_no_role") for arm in CAPTION_ARMS
}


def run_seed(layout: RunLayout, default: int = 0) -> int:
    """The seed a run was made with (it fixes the oracle's caption draw); `default` without run.json
    (a run folder filled by the stage commands)."""
    return read_json(layout.run_json).get("seed", default) if layout.run_json.exists() else default


def arm_captions(
    layout: RunLayout, arm: str, dataset: Dataset, seed: int, queries: Mapping[str, list[str]] | None = None
) -> dict[str, str | None] | None:
    """video id -> the auxiliary caption this arm gives each test video (None: no caption)."""
    from ..captioner.generate import first_captions, load_captions
    from ..retrieval.score import reference_captions

    if arm == "no_caption":
        return None
    if arm == "reference":  # oracle: a reference sentence that is not the query
        return reference_captions(dataset, "test", seed=seed, queries=queries)
    return first_captions(load_captions(layout.captions(arm, "test")))


def evaluate_run(
    layout: RunLayout,
    dataset: Dataset,
    store,
    queries: Mapping[str, list[str]] | None = None,
    out_path: str | Path | None = None,
    seed: int | None = None,
) -> dict:
    """Metrics of every (arm, retriever) pair; writes out_path (default RUN/results.json), keeping
    the other keys (run metadata) of a file already there. seed: the oracle's draw (default: the
    run's seed from run.json, else 0)."""
    from ..retrieval.model import Retriever
    from ..retrieval.score import Scorer, evaluate

    seed = run_seed(layout) if seed is None else seed
    scorers: dict[str, Scorer] = {}  # one per retriever: its query vectors are cached across arms
    rerankers: dict = {}  # one per reranker, loaded once for every arm
    arms: dict[str, dict] = {}
    by_arm: dict[str, dict | None] = {}  # the captions each arm was evaluated with
    for arm in CAPTION_ARMS:
        captions = by_arm[arm] = arm_captions(layout, arm, dataset, seed, queries)
        arms[arm] = {}
        for name in ARM_RETRIEVERS[arm]:
            if name not in scorers:
                scorers[name] = Scorer(Retriever.from_pretrained(layout.retriever_model(name)).eval())
            arms[arm][name] = evaluate(
                scorers[name].model, dataset, store, captions, "test", queries, scorer=scorers[name]
            )
        arms[arm].update(_reranked_rows(layout, arm, dataset, store, captions, queries, scorers, rerankers))
    for rows in arms.values():
        for m in rows.values():
            if not math.isfinite(m["twin_acc"]):  # no test video has a twin: nothing to report
                del m["twin_acc"]
    path = Path(out_path) if out_path else layout.results
    old = read_json(path) if path.exists() else {}
    results = {
        **old,
        "arms": arms,
        "queries": "custom" if queries else "built-in",
        "caption_factors": caption_factors(by_arm, dataset),
    }
    write_json(path, results)
    return arms


def _reranked_rows(
    layout: RunLayout, arm: str, dataset, store, captions, queries, scorers, rerankers: dict
) -> dict[str, dict]:
    """The two-stage rows of one arm: each reranker the run has re-orders its first stage's top k.
    rerankers: name -> loaded `Reranker`, filled as they are first needed (shared across arms)."""
    from ..io import read_json
    from ..rerank.evaluate import evaluate_reranked
    from ..rerank.model import Reranker
    from ..retrieval.model import Retriever

    rows = {}
    for name in ARM_RERANKERS[arm]:
        folder = layout.reranker_model(name)
        if not (folder / "config.json").exists():
            continue
        first = RERANKERS[name][1]
        retriever = (
            scorers[first].model if first in scorers else Retriever.from_pretrained(layout.retriever_model(first))
        )
        k = read_json(layout.reranker(name) / "train_config.json")["k"]
        if name not in rerankers:
            rerankers[name] = Reranker.from_pretrained(folder)
        rows[name] = evaluate_reranked(rerankers[name], retriever.eval(), dataset, store, captions, "test", queries, k)
    return rows


def caption_factors(by_arm: Mapping[str, Mapping[str, str | None] | None], dataset: Dataset) -> dict[str, dict]:
    """arm -> % of its test captions stating each clip factor right (arms with captions only).
    by_arm: arm -> {video id: caption} as `arm_captions` gives them (None: the no-caption arm)."""
    from ..captioner.factors import factor_scores

    out = {}
    for arm, captions in by_arm.items():
        if captions:
            scores = factor_scores((c, dataset.by_id[v].factors) for v, c in captions.items() if c is not None)
            if len(scores) > 1:  # more than the count: the data has factors
                out[arm] = scores
    return out


def print_factors(factors: Mapping[str, Mapping[str, float]], title: str) -> None:
    """Table: arm x factor, % stated right (cells may be "mean ± std" strings)."""
    from rich.console import Console
    from rich.table import Table

    if not factors:
        return
    cols = [k for k in next(iter(factors.values())) if k != "n"]
    table = Table(title=title)
    for col in ("captions", *cols):
        table.add_column(col, justify="left" if col == "captions" else "right")
    for arm, scores in factors.items():
        table.add_row(arm, *(str(scores.get(c, "-")) for c in cols))
    Console(width=max(Console().width, 110)).print(table)


def has_twin_accuracy(arms: Mapping[str, Mapping[str, dict]]) -> bool:
    """Whether the results carry twin accuracy (data with twin groups) in every row."""
    return all("twin_acc" in m for by_retriever in arms.values() for m in by_retriever.values())


def table_rows(arms: Mapping[str, Mapping[str, dict]]) -> list[list[str]]:
    """One row per (arm, retriever): the table's cells, twin accuracy last where every row has it."""
    rows, with_twins = [], has_twin_accuracy(arms)
    for arm, by_retriever in arms.items():
        for name, m in by_retriever.items():
            t, v = m["t2v"], m["v2t"]
            twin = [f"{m['twin_acc']:.1f}"] if with_twins else []
            rows.append(
                [
                    arm,
                    name,
                    f"{t['R1']:.1f}",
                    f"{t['R5']:.1f}",
                    f"{t['R10']:.1f}",
                    f"{t['MdR']:.0f}",
                    f"{t['MnR']:.1f}",
                    f"{v['R1']:.1f}",
                    *twin,
                ]
            )
    return rows


def print_table(arms: Mapping[str, Mapping[str, dict]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    cols = ("captions", "retriever", "t2v R@1", "R@5", "R@10", "MdR", "MnR", "v2t R@1")
    for col in cols + (("twin acc %",) if has_twin_accuracy(arms) else ()):
        table.add_column(col, justify="left" if col in ("captions", "retriever") else "right")
    for row in table_rows(arms):
        table.add_row(*row)
    Console(width=max(Console().width, 110)).print(table)  # stdout: the results are the output


def plot_r1(arms: Mapping[str, Mapping[str, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{a}\n{r}" for a, rs in arms.items() for r in rs]
    values = [m["t2v"]["R1"] for rs in arms.values() for m in rs.values()]
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(labels)), 4))
    ax.bar(range(len(values)), values, color="tab:blue")
    ax.set_xticks(range(len(values)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("text-to-video R@1 (%)")
    ax.set_title("R@1 per caption arm and retriever (test split)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_dpo_curves(layout: RunLayout, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..dpo.train import read_stats

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.5))
    for arm in ("dpo", "dg_dpo"):
        log = read_stats(layout.captioner(arm)) if layout.captioner(arm).exists() else []
        steps = [step for step, _ in log]
        ax_loss.plot(steps, [s.loss for _, s in log], label=arm)
        ax_acc.plot(steps, [s.reward_acc for _, s in log], label=arm)
    ax_loss.set(xlabel="step", ylabel="loss", title="DPO training loss")
    ax_acc.set(xlabel="step", ylabel="reward accuracy", title="implicit-reward accuracy")
    ax_loss.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_caption_examples(layout: RunLayout, dataset: Dataset, path: Path, n_groups: int = 3) -> None:
    """captions.md: for whole twin groups of test clips (lone videos on data without groups), the
    factors where the data has them, the query and every arm's caption."""
    seed = run_seed(layout)
    caps = {arm: arm_captions(layout, arm, dataset, seed) for arm in ("sft", "dpo", "dg_dpo", "reference")}
    units = dataset.units(v.id for v in dataset.split("test"))
    lines = ["# Caption examples per arm (test clips, whole twin groups)", ""]
    for unit in units[:n_groups]:
        lone = dataset.by_id[unit[0]].group is None
        lines += [f"## {'video' if lone else 'twin group'} {dataset.group_key(unit[0])}", ""]
        for v in map(dataset.by_id.get, unit):
            factors = f" — factors: `{_factor_line(v.factors)}`" if v.factors else ""
            lines.append(f"**{v.id}**{factors}  ")
            lines.append(f"query: _{dataset.queries_of(v.id)[0]}_  ")
            for arm, by_id in caps.items():
                lines.append(f"- {arm}: {by_id.get(v.id) if by_id else None}")
            lines.append("")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def left_out_note(dataset: Dataset) -> str | None:
    """One line naming the TwinClips-only parts of the report this data set has nothing for (no
    twin groups: twin accuracy; no clip factors: the factor table and captions.md's factor lines)."""
    test = dataset.split("test")
    gone = []
    if not any(dataset.twins_of(v.id) for v in test):
        gone.append(("twin groups", "twin accuracy"))
    if not any(v.factors for v in test):
        gone.append(("clip factors", "the caption-factor table and the factor lines of captions.md"))
    if not gone:
        return None
    return (
        f"{dataset.name}: no {' and no '.join(g for g, _ in gone)}, so "
        f"{' and '.join(p for _, p in gone)} are left out of the report"
    )


def _factor_line(factors: Mapping) -> str:
    keep = ("size", "colour", "shape", "background", "motion", "speed", "event_order")
    return ", ".join(f"{k}={factors[k]}" for k in keep if k in factors) or str(dict(factors))[:200]


def aggregate(runs: list[Mapping[str, Mapping[str, dict]]]) -> dict[str, dict[str, dict[str, tuple[float, float]]]]:
    """Mean and sample standard deviation over runs (seeds) of each arm/retriever's headline numbers.

    runs: the `arms` dicts of several results.json. Returns arm -> retriever -> metric -> (mean, std);
    std is 0.0 for a single run. Only (arm, retriever) pairs present in every run are kept."""
    import statistics

    picks = {
        "t2v R@1": ("t2v", "R1"),
        "t2v R@5": ("t2v", "R5"),
        "t2v MnR": ("t2v", "MnR"),
        "v2t R@1": ("v2t", "R1"),
        "twin acc %": ("twin_acc", None),
    }
    out: dict = {}
    for arm, by_retriever in runs[0].items():
        for name in by_retriever:
            if not all(name in r.get(arm, {}) for r in runs):
                continue
            for label, (key, sub) in picks.items():
                if not all(key in r[arm][name] for r in runs):  # twin accuracy: data with twin groups only
                    continue
                values = [r[arm][name][key] if sub is None else r[arm][name][key][sub] for r in runs]
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                out.setdefault(arm, {}).setdefault(name, {})[label] = (statistics.fmean(values), std)
    return out


def aggregate_factors(runs: list[Mapping[str, Mapping[str, float]]]) -> dict[str, dict[str, str]]:
    """Mean ± std over runs of each arm's caption-factor percentages (arms/factors in every run)."""
    import statistics

    out: dict = {}
    for arm, scores in runs[0].items():
        for factor in scores:
            values = [r[arm][factor] for r in runs if factor in r.get(arm, {})]
            if factor != "n" and len(values) == len(runs):
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                out.setdefault(arm, {})[factor] = f"{statistics.fmean(values):.1f} ± {std:.1f}"
    return out


def print_summary(summary: Mapping[str, Mapping[str, Mapping[str, tuple[float, float]]]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    labels = next(iter(next(iter(summary.values())).values())).keys()
    table = Table(title=title)
    for col in ("captions", "retriever", *labels):
        table.add_column(col, justify="left" if col in ("captions", "retriever") else "right")
    for arm, by_retriever in summary.items():
        for name, cells in by_retriever.items():
            table.add_row(arm, name, *(f"{m:.1f} ± {s:.1f}" for m, s in cells.values()))
    Console(width=max(Console().width, 120)).print(table)
