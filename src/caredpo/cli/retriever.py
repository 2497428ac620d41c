"""`caredpo retriever train` and the top-level `caredpo eval` (retrieval metrics of a caption set)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from ..records import DataError
from ..retrieval.train import RetrieverTrainConfig
from .common import PRESET, SEED, THREADS, load_data, preset_config, set_threads
from .flags import NO_OVERRIDES, Overrides, config_flags

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Train the role-embedding retriever.")

REFERENCE = "reference"  # --captions value: oracle reference captions (never the query)


@app.command("train")
@config_flags(
    exclude=("retriever.model.use_caption", "retriever.model.role_embeddings"), retriever=RetrieverTrainConfig
)
def train(
    data: Path = typer.Option(..., "--data", help="Data folder (any supported layout)."),
    features: Path | None = typer.Option(None, "--features", help="Features folder (default: DATA/features)."),
    out: Path = typer.Option(..., "--out", help="Run folder: log.jsonl, checkpoint/, model/, metrics.json."),
    variant: str = typer.Option("caption_role", "--variant", help="no_caption, caption or caption_role."),
    captions: Path | None = typer.Option(
        None, "--captions", help="Generated captions.jsonl added to the caption draws."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoint (a finished one is kept)."),
    preset: str = PRESET,
    seed: int = SEED,
    threads: int = THREADS,
    overrides: Overrides = NO_OVERRIDES,
) -> None:
    """Train the retriever on a data set's train split; evaluates on the test split at the end.
    Under `torchrun --nproc_per_node=N` data-parallel (same result; rank 0 writes)."""
    from .. import dist
    from ..pipeline.stages import train_one_retriever
    from ..progress import console

    set_threads(threads)
    try:
        base = preset_config(preset, seed).retriever_variant(variant)
    except ValueError as e:
        raise DataError(f"--variant: {e}") from None
    cfg = overrides.apply("retriever", base)
    dataset, store = load_data(data, features, seed)
    with dist.session():
        metrics = train_one_retriever(cfg, dataset, store, out, captions, resume=resume, log=console().print)
        main = dist.is_main()
    if main:
        _print_table({cfg.model.variant: metrics})
        typer.echo(str(out / "model"))


def evaluate_cmd(
    model: Path | None = typer.Option(
        None, "--model", help="Retriever folder (save_pretrained output, e.g. RUN/model)."
    ),
    data: Path | None = typer.Option(None, "--data", help="Data folder (any supported layout)."),
    run: Path | None = typer.Option(None, "--run", help="A finished `caredpo run` folder: re-evaluate every arm."),
    features: Path | None = typer.Option(None, "--features", help="Features folder (default: DATA/features)."),
    split: str = typer.Option("test", "--split"),
    captions: str | None = typer.Option(
        None, "--captions", help="captions.jsonl (first caption per video), 'reference' (oracle), or none."
    ),
    queries: Path | None = typer.Option(
        None, "--queries", help="JSON {video_id: [sentence, ...]} replacing the built-in queries."
    ),
    reranker: Path | None = typer.Option(
        None, "--reranker", help="Reranker folder (`caredpo reranker train`): also the two-stage ranking."
    ),
    k: int = typer.Option(16, "--k", help="--reranker: the first-stage top k it re-orders."),
    out: Path | None = typer.Option(None, "--out", help="Write the metrics JSON here."),
    seed: int = typer.Option(0, "--seed", help="Draw of the reference captions."),
    batch_size: int = typer.Option(64, "--batch-size"),
    threads: int = typer.Option(0, "--threads", help="torch threads (0: torch's default)."),
    device: str = typer.Option("cpu", "--device", help="torch device, e.g. cuda."),
) -> None:
    """Retrieval metrics (t2v / v2t R@1/5/10, MdR, MnR, twin accuracy) of a model and caption set."""
    from ..captioner.generate import first_captions, load_captions
    from ..io import write_json
    from ..retrieval.model import Retriever
    from ..retrieval.score import Scorer, evaluate, read_queries, reference_captions

    set_threads(threads)
    if run is not None:
        return _evaluate_run(run, queries, out, seed)
    if model is None or data is None:
        raise typer.BadParameter("give --run RUN_DIR, or both --model and --data")
    if not (model / "config.json").exists():
        raise FileNotFoundError(f"{model}: no retriever here (expected config.json from save_pretrained)")
    dataset, store = load_data(data, features, seed)
    q = read_queries(queries) if queries else None
    caps = _captions(captions, dataset, split, seed, q, load_captions, first_captions, reference_captions)
    retriever = Retriever.from_pretrained(model).to(device)
    result = evaluate(retriever, dataset, store, caps, split=split, queries=q, scorer=Scorer(retriever, batch_size))
    result.update(model=str(model), captions=captions or "none", queries=str(queries) if queries else "built-in")
    rows = {f"{retriever.config.variant} / {captions or 'none'}": result}
    if reranker is not None:
        from ..pipeline.stages import model_dir
        from ..rerank.evaluate import evaluate_reranked
        from ..rerank.model import Reranker

        rr = Reranker.from_pretrained(model_dir(reranker), device=device)
        result["reranked"] = evaluate_reranked(rr, retriever.eval(), dataset, store, caps, split, q, k)
        rows[f"{rr.config.variant} reranking top {k}"] = result["reranked"]
    _print_table(rows)
    if out:
        write_json(out, result)
        typer.echo(str(out))


def _evaluate_run(run: Path, queries: Path | None, out: Path | None, seed: int) -> None:
    """Every caption arm x retriever of a run folder (`caredpo run`, or the stage commands writing
    its layout), on the built-in or the user's queries. seed: the oracle's draw where the folder
    has no run.json to say it."""
    from ..data.splits import with_features
    from ..features import FeatureStore
    from ..pipeline.layout import RunLayout
    from ..pipeline.report import evaluate_run, print_table, run_seed
    from ..pipeline.stages import TUNED_ARMS, run_dataset
    from ..retrieval.score import read_queries

    layout = RunLayout.load(run)
    missing = [str(p) for p in (layout.captions(arm, "test") for arm in TUNED_ARMS) if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{run}: not a finished run (no test captions {', '.join(missing)})")
    seed = run_seed(layout, seed)
    store = FeatureStore.load(layout.features)
    dataset = with_features(
        run_dataset(layout.data_source(), seed, log=lambda s: None), store.ids, str(layout.features)
    )
    q = read_queries(queries) if queries else None
    path = out or (layout.results_queries if queries else layout.results)
    arms = evaluate_run(layout, dataset, store, q, out_path=path, seed=seed)
    print_table(arms, f"{run} — {'queries from ' + str(queries) if queries else 'built-in queries'}")
    typer.echo(str(path))


def _captions(arg, dataset, split, seed, queries, load_pool, first, reference):
    if arg is None or arg.lower() == "none":
        return None
    if arg == REFERENCE:
        return reference(dataset, split, seed=seed, queries=queries)
    return first(load_pool(Path(arg)))


def _print_table(rows: dict[str, dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="retrieval")
    table.add_column("run")
    for d in ("t2v", "v2t"):
        for k in ("R1", "R5", "R10", "MdR", "MnR"):
            table.add_column(f"{d} {k}", justify="right")
    table.add_column("twin acc", justify="right")
    for name, m in rows.items():
        cells = [f"{m[d][k]:.1f}" for d in ("t2v", "v2t") for k in ("R1", "R5", "R10", "MdR", "MnR")]
        table.add_row(name, *cells, f"{m.get('twin_acc', float('nan')):.1f}")
    Console(file=sys.stdout, width=160).print(table)


def register(root: typer.Typer) -> None:
    root.command("eval")(evaluate_cmd)
