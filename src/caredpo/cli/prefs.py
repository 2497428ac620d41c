"""`caredpo prefs`: preference groups for DG-DPO from the SFT captioner and a trained retriever.

    caredpo prefs --data D --features D/features --captioner RUN/captioner/sft \
        --retriever RUN/retriever/role --train-captions RUN/captions/sft_train.jsonl --out RUN/prefs
    caredpo prefs --captioner hf --model-path /models/Qwen2-VL-2B-Instruct ...   # a video MLLM (GPU)
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(root: typer.Typer) -> None:
    root.command("prefs", help="Sample K captions per training video and reward them by retrieval.")(prefs)


def prefs(
    data: Path = typer.Option(..., "--data", help="data set folder (TwinClips or a supported layout)"),
    captioner: Path = typer.Option(..., "--captioner", help="SFT captioner folder (= the reference policy), "
                                   "or `hf` for a Hugging Face video MLLM (with --model-path)"),
    model_path: Optional[Path] = typer.Option(None, "--model-path", help="--captioner hf: local HF model folder"),
    retriever: Path = typer.Option(..., "--retriever", help="trained retriever folder (model/ inside is fine)"),
    train_captions: Path = typer.Option(..., "--train-captions", help="greedy captions of training videos (jsonl)"),
    out: Path = typer.Option(..., "--out", help="output folder: groups.jsonl + prefs.json"),
    features: Optional[Path] = typer.Option(None, "--features", help="features folder (default DATA/features)"),
    samples: int = typer.Option(4, "--samples", help="K captions sampled per video"),
    reward: str = typer.Option("contrastive", "--reward", help="contrastive | relevance"),
    temperature: float = typer.Option(1.0, "--temperature"),
    top_p: float = typer.Option(0.95, "--top-p"),
    max_videos: int = typer.Option(0, "--max-videos", help="first N training videos only (0: all)"),
    seed: int = typer.Option(0, "--seed"),
    export_trl: Optional[Path] = typer.Option(None, "--export-trl", help="also write the pairs for trl "
                                              "(prompt/chosen/rejected, a datasets folder); see `caredpo export-trl`"),
) -> None:
    from .. import dist
    from ..captioner.generate import load_captions
    from ..data import load_dataset
    from ..dpo.prefs import PrefsConfig, build_preferences
    from ..features import FeatureStore
    from ..retrieval.model import Retriever
    from ..retrieval.score import Scorer
    from .common import load_captioner, visual_input

    cfg = PrefsConfig(num_samples=samples, reward=reward, temperature=temperature, top_p=top_p,
                      max_videos=max_videos, seed=seed)
    dataset = load_dataset(data)
    store = FeatureStore.load(features or data / "features")
    ret_dir = retriever / "model" if (retriever / "model").is_dir() else retriever
    greedy = {v: caps[0] for v, caps in load_captions(train_captions).items()}
    with dist.session():  # under torchrun: twin groups sharded over the processes, then merged
        reference = load_captioner(captioner, model_path).eval()
        path = build_preferences(reference, Scorer(Retriever.from_pretrained(ret_dir).eval()), dataset, store, out,
                                 greedy, cfg, visual=visual_input(reference, dataset, store))
        main = dist.is_main()
    if main:
        print(f"preference groups: {path}")
    if main and export_trl:
        from ..dpo.export import export_pairs

        print(f"trl pairs: {export_pairs(path, dataset, export_trl, reference.config.prompt)}")
