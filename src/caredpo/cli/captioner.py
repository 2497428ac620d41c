"""`caredpo captioner sft` and `caredpo captioner generate` (stages `sft`, `train_captions`, `test_captions`)."""

from __future__ import annotations

from pathlib import Path

import typer

from ..captioner.generate import SamplingConfig
from ..captioner.model import CaptionerConfig
from ..captioner.sft import SFTConfig
from .common import PRESET, SEED, THREADS, load_data, preset_config, read_data, set_threads
from .flags import NO_OVERRIDES, Overrides, config_flags

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="The video captioner: supervised fine-tuning and caption generation.",
)

# --split -> the preset's sampling config (the pipeline captions train videos for the retrievers'
# pool and test videos per arm; other splits take the test settings)
SPLIT_SAMPLING = {"train": "train_captions"}
DEFAULT_SAMPLING = "test_captions"


@app.command("sft")
@config_flags(captioner=CaptionerConfig, sft=SFTConfig)
def sft(
    data: Path = typer.Option(..., "--data", help="Data folder (any supported layout)."),
    features: Path | None = typer.Option(None, "--features", help="Features folder (default: DATA/features)."),
    out: Path = typer.Option(..., "--out", help="Run folder: model/, checkpoint/, log.jsonl, metrics.json."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoint."),
    preset: str = PRESET,
    seed: int = SEED,
    threads: int = THREADS,
    overrides: Overrides = NO_OVERRIDES,
) -> None:
    """Projector alignment, then fine-tuning of projector + LoRA on the train split's sentences.
    Under `torchrun --nproc_per_node=N` each step's videos are split over the processes."""
    from .. import dist
    from ..pipeline.stages import train_captioner
    from ..progress import console

    set_threads(threads)
    config = preset_config(preset, seed)
    model_cfg, sft_cfg = overrides.apply("captioner", config.captioner), overrides.apply("sft", config.sft)
    dataset, store = load_data(data, features, seed)
    with dist.session():
        result = train_captioner(dataset, store, out, model_cfg, sft_cfg, resume=resume, log=console().print)
        main = dist.is_main()
    if main:
        console().print(f"final val loss {result['final_val_loss']}  ({result['seconds_this_run']} s)")
        typer.echo(str(out / "model"))


@app.command("generate")
@config_flags(sampling=SamplingConfig)
def generate(
    model: Path | None = typer.Option(None, "--model", help="Captioner folder (or an SFT/DPO run folder)."),
    data: Path = typer.Option(..., "--data", help="Data folder."),
    backend: str | None = typer.Option(
        None, "--captioner", help="hf: a Hugging Face video MLLM from --model-path instead of our captioner (--model)."
    ),
    model_path: Path | None = typer.Option(
        None, "--model-path", help="--captioner hf: local HF model folder (or the model/ folder `caredpo dpo` saved)."
    ),
    features: Path | None = typer.Option(None, "--features", help="Features folder (default: DATA/features)."),
    out: Path = typer.Option(..., "--out", help="captions .jsonl (appended to; resumes without duplicates)."),
    split: str = typer.Option(
        "test",
        "--split",
        help="Which split to caption (train, val, test, all); train "
        "takes the preset's train_captions settings, the others its test_captions.",
    ),
    lm: str | None = typer.Option(None, "--lm", help="Override where the base LM comes from."),
    preset: str = PRESET,
    seed: int = SEED,
    threads: int = THREADS,
    overrides: Overrides = NO_OVERRIDES,
) -> None:
    """Caption the videos of a split into a jsonl: video_id, captions, sampling settings.
    Under `torchrun --nproc_per_node=N` the videos are sharded over the processes and merged."""
    from .. import dist
    from ..captioner.model import VideoCaptioner
    from ..pipeline.stages import split_ids, write_captions
    from .common import load_captioner

    set_threads(threads)
    base = getattr(preset_config(preset, seed), SPLIT_SAMPLING.get(split, DEFAULT_SAMPLING))
    sampling = overrides.apply("sampling", base)
    hf = _is_hf(backend, model, model_path)
    dataset, store = (read_data(data, seed), None) if hf else load_data(data, features, seed)
    ids = split_ids(dataset, store, split)  # an HF model decodes the videos itself: no features needed
    captioner = load_captioner("hf", model_path) if hf else VideoCaptioner.from_pretrained(model, lm=lm)
    captioner.eval()
    with dist.session():
        path = write_captions(captioner, store, ids, out, sampling, visual=captioner.frames(dataset) if hf else None)
        main = dist.is_main()
    if main:
        typer.echo(str(path))


def _is_hf(backend: str | None, model: Path | None, model_path: Path | None) -> bool:
    """--captioner hf --model-path PATH (an HF video MLLM) or our captioner from --model FOLDER."""
    if backend not in (None, "hf"):
        raise typer.BadParameter(f"--captioner takes only `hf` (our captioner: --model FOLDER), got {backend!r}")
    hf = backend == "hf"
    if (model if hf else model_path) is not None:
        raise typer.BadParameter("use --model FOLDER for our captioner, --captioner hf --model-path PATH for an HF one")
    if not hf and model is None:
        raise typer.BadParameter("--model FOLDER is required (or --captioner hf --model-path PATH)")
    return hf
