"""`caredpo retriever train` and the top-level `caredpo eval` (retrieval metrics of a caption set)."""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer

from .common import load_data, set_threads

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Train the role-embedding retriever.")

REFERENCE = "reference"  # --captions value: oracle reference captions (never the query)


@app.command("train")
def train(
    data: Path = typer.Option(..., "--data", help="Data folder (any supported layout)."),
    features: Optional[Path] = typer.Option(None, "--features", help="Features folder (default: DATA/features)."),
    out: Path = typer.Option(..., "--out", help="Run folder: log.jsonl, checkpoint/, model/, metrics.json."),
    preset: str = typer.Option("default", "--preset", help="default (MiniLM, the fine-grained recipe), default-uniform (the recipe before it) or smoke (tiny random encoder)."),
    variant: str = typer.Option("caption_role", "--variant", help="no_caption, caption or caption_role."),
    pooling: str = typer.Option("mean", "--video-pooling", help="mean (one video token) or sequence (one per frame)."),
    captions: Optional[Path] = typer.Option(None, "--captions", help="Generated captions.jsonl added to the caption draws."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Override the preset's epochs."),
    batch_groups: Optional[int] = typer.Option(None, "--batch-groups", help="Twin groups per batch."),
    train_layers: Optional[int] = typer.Option(None, "--train-layers", help="Top encoder layers that train (-1: all)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Encoder learning rate."),
    max_steps: int = typer.Option(0, "--max-steps", help="Stop after this many steps (0: epochs decide)."),
    eval_every: int = typer.Option(0, "--eval-every", help="Steps between evaluations (0: at the end)."),
    save_every: int = typer.Option(50, "--save-every", help="Steps between checkpoints (0: at the end)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoint."),
    seed: int = typer.Option(0, "--seed"),
    threads: int = typer.Option(0, "--threads", help="torch threads (0: torch's default)."),
    device: str = typer.Option("cpu", "--device", help="torch device, e.g. cuda."),
) -> None:
    """Train the retriever on a data set's train split; evaluates on the test split at the end.
    Under `torchrun --nproc_per_node=N` data-parallel (same result; rank 0 writes)."""
    from .. import dist
    from ..progress import console
    from ..retrieval.train import load_caption_pool, preset as make_preset, train_retriever

    set_threads(threads)
    cfg = _train_config(make_preset, preset, variant, pooling, seed, epochs=epochs, batch_groups=batch_groups,
                        lr=lr, max_steps=max_steps, eval_every=eval_every, save_every=save_every,
                        train_layers=train_layers, device=device)
    dataset, store = load_data(data, features)
    pool = load_caption_pool(captions) if captions else None
    log = console().print
    with dist.session():
        _, metrics = train_retriever(cfg, dataset, store, out, caption_pool=pool, resume=resume, log=log)
        main = dist.is_main()
    if main:
        _print_table({cfg.model.variant: metrics})
        typer.echo(str(out / "model"))


def _train_config(make_preset, preset: str, variant: str, pooling: str, seed: int, train_layers, **kw):
    try:
        cfg = make_preset(preset)
        model = cfg.model.with_variant(variant)
        model = replace(model, video_pooling=pooling, seed=seed,
                        **({} if train_layers is None else {"train_layers": train_layers}))
        return replace(cfg, model=model, seed=seed, **{k: v for k, v in kw.items() if v is not None})
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


def evaluate_cmd(
    model: Optional[Path] = typer.Option(None, "--model", help="Retriever folder (save_pretrained output, e.g. RUN/model)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Data folder (any supported layout)."),
    run: Optional[Path] = typer.Option(None, "--run", help="A finished `caredpo run` folder: re-evaluate every arm."),
    features: Optional[Path] = typer.Option(None, "--features", help="Features folder (default: DATA/features)."),
    split: str = typer.Option("test", "--split"),
    captions: Optional[str] = typer.Option(None, "--captions",
                                           help="captions.jsonl (first caption per video), 'reference' (oracle), or none."),
    queries: Optional[Path] = typer.Option(None, "--queries", help="JSON {video_id: [sentence, ...]} replacing the built-in queries."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the metrics JSON here."),
    seed: int = typer.Option(0, "--seed", help="Draw of the reference captions."),
    batch_size: int = typer.Option(64, "--batch-size"),
    threads: int = typer.Option(0, "--threads", help="torch threads (0: torch's default)."),
    device: str = typer.Option("cpu", "--device", help="torch device, e.g. cuda."),
) -> None:
    """Retrieval metrics (t2v / v2t R@1/5/10, MdR, MnR, twin accuracy) of a model and caption set."""
    from ..io import write_json
    from ..retrieval.model import Retriever
    from ..retrieval.score import Scorer, evaluate, reference_captions
    from ..retrieval.train import first_captions, load_caption_pool, read_queries

    set_threads(threads)
    if run is not None:
        return _evaluate_run(run, queries, out)
    if model is None or data is None:
        raise typer.BadParameter("give --run RUN_DIR, or both --model and --data")
    if not (model / "config.json").exists():
        raise FileNotFoundError(f"{model}: no retriever here (expected config.json from save_pretrained)")
    dataset, store = load_data(data, features)
    q = read_queries(queries) if queries else None
    caps = _captions(captions, dataset, split, seed, q, load_caption_pool, first_captions, reference_captions)
    retriever = Retriever.from_pretrained(model).to(device)
    result = evaluate(retriever, dataset, store, caps, split=split, queries=q, scorer=Scorer(retriever, batch_size))
    result.update(model=str(model), captions=captions or "none", queries=str(queries) if queries else "built-in")
    _print_table({f"{retriever.config.variant} / {captions or 'none'}": result})
    if out:
        write_json(out, result)
        typer.echo(str(out))


def _evaluate_run(run: Path, queries: Optional[Path], out: Optional[Path]) -> None:
    """Every caption arm x retriever of a finished run, on the built-in or the user's queries."""
    from ..pipeline.report import evaluate_run, print_table
    from ..retrieval.train import read_queries

    if not (run / "stages" / "test_captions.json").exists():
        raise FileNotFoundError(f"{run}: not a finished caredpo run (no stages/test_captions.json)")
    dataset, store = load_data(run / "data", None)
    q = read_queries(queries) if queries else None
    path = out or run / ("results_queries.json" if queries else "results.json")
    arms = evaluate_run(run, dataset, store, q, out_path=path)
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
