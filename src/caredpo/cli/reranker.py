"""`caredpo reranker train`: the MLLM reranker of one variant (a stage of `caredpo run`)."""

from __future__ import annotations

from pathlib import Path

import typer

from ..records import DataError
from ..rerank.train import RerankerTrainConfig
from .common import PRESET, SEED, THREADS, check_captioner_args, load_data, preset_config, set_threads
from .flags import NO_OVERRIDES, Overrides, config_flags

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Train the MLLM reranker.")


@app.command("train")
@config_flags(exclude=("reranker.model.variant", "reranker.model.answers"), reranker=RerankerTrainConfig)
def train(
    data: Path = typer.Option(..., "--data", help="Data folder (any supported layout)."),
    features: Path | None = typer.Option(None, "--features", help="Features folder (default: DATA/features)."),
    captioner: Path = typer.Option(
        ..., "--captioner", help="Captioner folder to start from (the SFT one), or `hf` with --model-path."
    ),
    model_path: Path | None = typer.Option(
        None, "--model-path", help="--captioner hf: a local Hugging Face video MLLM folder (Qwen2-VL, ...)."
    ),
    first_stage: Path = typer.Option(..., "--first-stage", help="Retriever folder whose neighbours are the negatives."),
    out: Path = typer.Option(..., "--out", help="Run folder: log.jsonl, checkpoint/, model/, metrics.json."),
    name: str = typer.Option("rerank_role", "--name", help="rerank_role, rerank_no_role or rerank_no_caption."),
    captions: Path | None = typer.Option(None, "--captions", help="Generated captions.jsonl added to the draws."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoint (a finished one is kept)."),
    preset: str = PRESET,
    seed: int = SEED,
    threads: int = THREADS,
    overrides: Overrides = NO_OVERRIDES,
) -> None:
    """Listwise training of a reranker on the train split (rerank/train.py). A preset without
    rerankers (smoke and default; `full` has them) trains nothing, as `caredpo run` does."""
    from ..pipeline.presets import RERANKERS
    from ..pipeline.stages import train_one_reranker

    set_threads(threads)
    check_captioner_args(captioner, model_path)
    config = preset_config(preset, seed)
    if name not in RERANKERS:
        raise DataError(f"--name {name!r}: choose one of {sorted(RERANKERS)}")
    if config.reranker is None:
        typer.echo(f"preset {preset!r} has no reranker: nothing to train (--preset full has them)")
        return
    cfg = overrides.apply("reranker", config.reranker_config(name))
    dataset, store = load_data(data, features, seed)
    metrics = train_one_reranker(cfg, captioner, dataset, store, out, first_stage, captions, resume, model_path)
    typer.echo(f"{name}: final list accuracy {metrics.get('list_accuracy')}; {out / 'model'}")
