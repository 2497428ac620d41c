"""`caredpo prefs`: preference groups for DG-DPO from the SFT captioner and a trained retriever.

    caredpo prefs --preset default --data D --captioner RUN/captioner/sft/model \
        --retriever RUN/retriever/role --train-captions RUN/captions/sft_train.jsonl --out RUN/prefs
    caredpo prefs --captioner hf --model-path /models/Qwen2-VL-2B-Instruct ...   # a video MLLM (GPU)
    caredpo prefs ... --export-trl RUN/prefs/trl   # also the pairs for trl (`caredpo export-trl`)
"""

from __future__ import annotations

from pathlib import Path

import typer

from ..dpo.prefs import GROUPS_FILE, PrefsConfig
from .common import PRESET, SEED, preset_config
from .flags import NO_OVERRIDES, Overrides, config_flags


def register(root: typer.Typer) -> None:
    root.command("prefs", help="Sample K captions per training video and reward them by retrieval.")(prefs)


@config_flags(prefs=PrefsConfig)
def prefs(
    data: Path = typer.Option(..., "--data", help="data set folder (TwinClips or a supported layout)"),
    captioner: Path = typer.Option(
        ...,
        "--captioner",
        help="SFT captioner folder (= the reference policy), or `hf` for a Hugging Face video MLLM (with --model-path)",
    ),
    model_path: Path | None = typer.Option(None, "--model-path", help="--captioner hf: local HF model folder"),
    retriever: Path = typer.Option(..., "--retriever", help="trained retriever folder (model/ inside is fine)"),
    reranker: Path | None = typer.Option(
        None, "--reranker", help="trained reranker folder: the reward with --reward-model reranker"
    ),
    train_captions: Path = typer.Option(..., "--train-captions", help="greedy captions of training videos (jsonl)"),
    out: Path = typer.Option(..., "--out", help="output folder: groups.jsonl + prefs.json"),
    features: Path | None = typer.Option(None, "--features", help="features folder (default DATA/features)"),
    export_trl: Path | None = typer.Option(
        None,
        "--export-trl",
        help="also write the pairs for trl (prompt/chosen/rejected, a datasets folder); see `caredpo export-trl`",
    ),
    preset: str = PRESET,
    seed: int = SEED,
    overrides: Overrides = NO_OVERRIDES,
) -> None:
    from .. import dist
    from ..captioner.base import visual_source
    from ..pipeline.stages import build_prefs
    from .common import load_captioner, load_data

    cfg = overrides.apply("prefs", preset_config(preset, seed).prefs)
    dataset, store = load_data(data, features, seed)
    with dist.session():  # under torchrun: twin groups sharded over the processes, then merged
        reference = load_captioner(captioner, model_path).eval()
        build_prefs(
            reference,
            retriever,
            dataset,
            store,
            out,
            train_captions,
            cfg,
            visual=visual_source(reference, dataset, store),
            reranker=reranker,
        )
        main = dist.is_main()
    path = out / GROUPS_FILE
    if main:
        print(f"preference groups: {path}")
    if main and export_trl:
        from ..dpo.export import export_pairs

        print(f"trl pairs: {export_pairs(path, dataset, export_trl, reference.config.prompt)}")
