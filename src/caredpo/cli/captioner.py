"""`caredpo captioner sft` and `caredpo captioner generate`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import load_data, set_threads

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="The video captioner: supervised fine-tuning and caption generation.")

@app.command("sft")
def sft(
    data: Path = typer.Option(..., "--data", help="Data folder (any supported layout)."),
    features: Optional[Path] = typer.Option(None, "--features", help="Features folder (default: DATA/features)."),
    out: Path = typer.Option(..., "--out", help="Run folder: model/, checkpoint/, log.jsonl, metrics.json."),
    preset: str = typer.Option("default", "--preset", help="default (SmolLM2) or smoke (tiny random LM)."),
    lm: Optional[str] = typer.Option(None, "--lm", help="smollm2, tiny, or a local Hugging Face model folder."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps."),
    videos_per_step: Optional[int] = typer.Option(None, "--videos-per-step"),
    captions_per_video: Optional[int] = typer.Option(None, "--captions-per-video"),
    lora_layers: Optional[int] = typer.Option(None, "--lora-layers", help="Top LM layers with LoRA (-1 all, 0 none)."),
    lora_rank: Optional[int] = typer.Option(None, "--lora-rank"),
    lr_projector: Optional[float] = typer.Option(None, "--lr-projector"),
    lr_lora: Optional[float] = typer.Option(None, "--lr-lora"),
    align_steps: Optional[int] = typer.Option(None, "--align-steps",
                                              help="Projector alignment steps before SFT (0: none)."),
    val_every: Optional[int] = typer.Option(None, "--val-every", help="Steps between val passes (0: at the end)."),
    val_videos: Optional[int] = typer.Option(None, "--val-videos", help="At most this many val videos."),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Steps between checkpoints (0: at the end)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoint."),
    seed: int = typer.Option(0, "--seed"),
    threads: int = typer.Option(0, "--threads", help="torch threads (0: torch's default)."),
) -> None:
    """Fine-tune projector + LoRA on every reference sentence of the train split."""
    from ..captioner.model import VideoCaptioner
    from ..captioner.sft import train_sft
    from ..progress import console

    set_threads(threads)
    model_kw = _given(lm=lm, lora_layers=lora_layers, lora_rank=lora_rank, seed=seed)
    sft_kw = _given(steps=steps, videos_per_step=videos_per_step, captions_per_video=captions_per_video,
                    lr_projector=lr_projector, lr_lora=lr_lora, align_steps=align_steps, val_every=val_every,
                    val_videos=val_videos, save_every=save_every, seed=seed)
    model_cfg, sft_cfg = _configs(preset, model_kw, sft_kw)
    dataset, store = load_data(data, features)
    model = VideoCaptioner(model_cfg)
    result = train_sft(model, dataset, store, out, sft_cfg, resume=resume, log=console().print)
    console().print(f"final val loss {result['final_val_loss']}  ({result['seconds_this_run']} s)")
    typer.echo(str(out / "model"))


@app.command("generate")
def generate(
    model: Optional[Path] = typer.Option(None, "--model", help="Captioner folder (or an SFT/DPO run folder)."),
    data: Path = typer.Option(..., "--data", help="Data folder."),
    backend: Optional[str] = typer.Option(None, "--captioner", help="hf: a Hugging Face video MLLM from "
                                          "--model-path instead of our captioner (--model)."),
    model_path: Optional[Path] = typer.Option(None, "--model-path", help="--captioner hf: local HF model folder "
                                              "(or the model/ folder `caredpo dpo` saved)."),
    features: Optional[Path] = typer.Option(None, "--features", help="Features folder (default: DATA/features)."),
    out: Path = typer.Option(..., "--out", help="captions .jsonl (appended to; resumes without duplicates)."),
    split: str = typer.Option("test", "--split", help="Which split to caption (train, val, test, all)."),
    n: int = typer.Option(1, "--n", "--num-captions",
                          help="Captions per video (under torchrun write --num-captions: it claims --n)."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p"),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens"),
    batch_videos: int = typer.Option(16, "--batch-videos", help="Videos per generate call."),
    lm: Optional[str] = typer.Option(None, "--lm", help="Override where the base LM comes from."),
    seed: int = typer.Option(0, "--seed"),
    threads: int = typer.Option(0, "--threads", help="torch threads (0: torch's default)."),
) -> None:
    """Caption the videos of a split into a jsonl: video_id, captions, sampling settings.
    Under `torchrun --nproc_per_node=N` the videos are sharded over the processes and merged."""
    from .. import dist
    from ..captioner.generate import SamplingConfig, generate_captions
    from ..captioner.model import VideoCaptioner
    from ..data import load_dataset
    from ..records import DataError
    from .common import load_captioner

    set_threads(threads)
    try:
        sampling = SamplingConfig(n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                  seed=seed, batch_videos=batch_videos)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    hf = _is_hf(backend, model, model_path)
    dataset, store = (load_dataset(data), None) if hf else load_data(data, features)
    videos = dataset.videos if split == "all" else dataset.split(split)
    ids = [v.id for v in videos if hf or v.id in store]  # an HF model decodes the videos itself
    if not ids:
        raise DataError(f"{data}: no videos {'' if hf else 'with features '}in split {split!r}")
    captioner = load_captioner("hf", model_path) if hf else VideoCaptioner.from_pretrained(model, lm=lm)
    captioner.eval()
    with dist.session():
        path = generate_captions(captioner, store, ids, out, sampling,
                                 visual=captioner.frames(dataset) if hf else None)
        main = dist.is_main()
    if main:
        typer.echo(str(path))


def _is_hf(backend: Optional[str], model: Optional[Path], model_path: Optional[Path]) -> bool:
    """--captioner hf --model-path PATH (an HF video MLLM) or our captioner from --model FOLDER."""
    if backend not in (None, "hf"):
        raise typer.BadParameter(f"--captioner takes only `hf` (our captioner: --model FOLDER), got {backend!r}")
    hf = backend == "hf"
    if (model if hf else model_path) is not None:
        raise typer.BadParameter("use --model FOLDER for our captioner, --captioner hf --model-path PATH for an HF one")
    if not hf and model is None:
        raise typer.BadParameter("--model FOLDER is required (or --captioner hf --model-path PATH)")
    return hf


def _configs(preset: str, model_kw: dict, sft_kw: dict):
    """The preset's captioner and SFT configs (those `caredpo run` uses), with the given overrides."""
    from dataclasses import replace

    from ..pipeline.presets import run_config

    try:
        base = run_config(preset)
        return replace(base.captioner, **model_kw), replace(base.sft, **sft_kw)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


def _given(**kw) -> dict:
    return {k: v for k, v in kw.items() if v is not None}
