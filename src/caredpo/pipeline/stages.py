"""The stages of `caredpo run`, in order. Each reads earlier stages' files from the run folder,
writes its own, resumes its own interrupted work, and returns a small dict for its marker.

    run/data/                   TwinClips mp4s + annotations.json, features/
    run/captioner/sft/          SFT captioner (model/, log)       -> pi_ref of both DPO arms
    run/captions/sft_train.jsonl  greedy captions of training videos
    run/retriever/<name>/       one retriever per RETRIEVERS entry
    run/prefs/groups.jsonl      preference groups with reference log-probs
    run/captioner/{dpo,dg_dpo}/ tuned captioners (model/, metrics.jsonl)
    run/captions/<arm>_test.jsonl greedy captions of test videos per caption arm
    run/results.json            the comparison (written by caredpo.pipeline.report)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

from ..records import Dataset
from .presets import RETRIEVERS, RunConfig

TUNED_ARMS = ("sft", "dpo", "dg_dpo")  # caption arms written by a captioner of ours


@dataclass
class RunContext:
    out: Path
    config: RunConfig
    log: Callable[[str], None] = print
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def data_dir(self) -> Path:
        return self.out / "data"

    @cached_property
    def dataset(self) -> Dataset:
        from ..data import load_dataset

        return load_dataset(self.data_dir)

    @cached_property
    def store(self):
        from ..features import FeatureStore

        return FeatureStore.load(self.data_dir / "features")

    def ids(self, split: str) -> list[str]:
        have = set(self.store.ids)
        return [v.id for v in self.dataset.split(split) if v.id in have]

    def captioner(self, arm: str):
        from ..captioner.model import VideoCaptioner

        return VideoCaptioner.from_pretrained(self.out / "captioner" / arm / "model").eval()

    def retriever(self, name: str):
        from ..retrieval.model import Retriever

        return Retriever.from_pretrained(self.out / "retriever" / name / "model").eval()

    def captions_file(self, arm: str, split: str) -> Path:
        return self.out / "captions" / f"{arm}_{split}.jsonl"


def stage_data(ctx: RunContext) -> dict:
    from ..data.twinclips import generate_twinclips

    generate_twinclips(ctx.config.data, ctx.data_dir)
    return {"videos": len(ctx.dataset.videos), "sentences": len(ctx.dataset.sentences)}


def stage_features(ctx: RunContext) -> dict:
    from ..features import extract_features

    extract_features(ctx.dataset, ctx.data_dir / "features", ctx.config.features)
    return {"videos": len(ctx.store.ids)}


def stage_sft(ctx: RunContext) -> dict:
    from ..captioner.model import VideoCaptioner
    from ..captioner.sft import train_sft

    model = VideoCaptioner(ctx.config.captioner)
    out = ctx.out / "captioner" / "sft"
    result = train_sft(model, ctx.dataset, ctx.store, out, ctx.config.sft, resume=True, log=ctx.log)
    return {"final_val_loss": result.get("final_val_loss")}


def stage_train_captions(ctx: RunContext) -> dict:
    """Greedy SFT captions of every training video: the retrievers draw auxiliary captions from
    them (generated_caption_prob), and the twins carry them in the preference stage's reward."""
    from ..captioner.generate import generate_captions

    ids = ctx.ids("train")
    generate_captions(ctx.captioner("sft"), ctx.store, ids, ctx.captions_file("sft", "train"),
                      ctx.config.train_captions)
    return {"videos": len(ids)}


def stage_retrievers(ctx: RunContext) -> dict:
    from ..captioner.generate import load_captions
    from ..retrieval.train import train_retriever

    pool = load_captions(ctx.captions_file("sft", "train"))
    done = {}
    for name in RETRIEVERS:
        out = ctx.out / "retriever" / name
        if (out / "metrics.json").exists() and (out / "model" / "config.json").exists():
            continue  # finished in an earlier, interrupted run
        cfg = ctx.config.retriever_config(name)
        _, metrics = train_retriever(cfg, ctx.dataset, ctx.store, out, caption_pool=pool, resume=True,
                                     log=ctx.log)
        done[name] = metrics.get("t2v", {}).get("R1")
    return {"monitored_t2v_R1": done}


def stage_prefs(ctx: RunContext) -> dict:
    from ..captioner.generate import load_captions
    from ..dpo.prefs import build_preferences, summarize
    from ..io import read_jsonl
    from ..retrieval.score import Scorer

    greedy = {v: caps[0] for v, caps in load_captions(ctx.captions_file("sft", "train")).items()}
    path = build_preferences(ctx.captioner("sft"), Scorer(ctx.retriever("role")), ctx.dataset, ctx.store,
                             ctx.out / "prefs", greedy, ctx.config.prefs)
    return summarize(list(read_jsonl(path)), ctx.dataset)


def _stage_policy(arm: str) -> Callable[[RunContext], dict]:
    def stage(ctx: RunContext) -> dict:
        from ..dpo.train import CHECKPOINT, train_dpo

        out = ctx.out / "captioner" / arm
        policy = ctx.captioner("sft")
        policy.set_trainable()  # projector + LoRA train; the base LM stays frozen
        config = getattr(ctx.config, arm)
        stats = train_dpo(policy, ctx.out / "prefs" / "groups.jsonl", ctx.store.grid_feats, out, config,
                          resume=(out / CHECKPOINT).exists())
        policy.save_pretrained(out / "model")
        return {k: v for k, v in stats.items() if isinstance(v, (int, float, str))}

    stage.__name__ = f"stage_{arm}"
    return stage


def stage_test_captions(ctx: RunContext) -> dict:
    from ..captioner.generate import generate_captions

    ids = ctx.ids("test")
    for arm in TUNED_ARMS:
        generate_captions(ctx.captioner(arm), ctx.store, ids, ctx.captions_file(arm, "test"),
                          ctx.config.test_captions)
    return {"videos": len(ids), "arms": list(TUNED_ARMS)}


def stage_evaluate(ctx: RunContext) -> dict:
    from .report import evaluate_run

    results = evaluate_run(ctx.out, ctx.dataset, ctx.store)
    return {"arms": sorted(results)}


# name -> stage, in run order
STAGES: dict[str, Callable[[RunContext], dict]] = {
    "data": stage_data,
    "features": stage_features,
    "sft": stage_sft,
    "train_captions": stage_train_captions,
    "retrievers": stage_retrievers,
    "prefs": stage_prefs,
    "dpo": _stage_policy("dpo"),
    "dg_dpo": _stage_policy("dg_dpo"),
    "test_captions": stage_test_captions,
    "evaluate": stage_evaluate,
}
