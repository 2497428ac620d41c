"""The stages, each written once: `caredpo run` calls them through `STAGES` (paths from the run
folder's `RunLayout`, configs from the preset) and every stage command (`caredpo features`,
`captioner sft`, ...) calls the same function with the paths and the preset + options it was given.
So a stage command with `--preset P --seed S` writes what `caredpo run --preset P --seed S` does.

Each stage resumes its own interrupted work. The `STAGES` entries return a small dict for the
stage's marker (RUN/stages/<name>.json).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ..data import DataSource
from ..records import DataError, Dataset
from .layout import RunLayout, TrainerFiles
from .presets import RERANKERS, RETRIEVERS, RunConfig

TUNED_ARMS = ("sft", "dpo", "dg_dpo")  # caption arms written by a captioner of ours
ROLE_RETRIEVER = "role"  # the retriever whose scores are the preference stage's reward
REWARD_RERANKER = "rerank_role"  # the reranker that gives it where PrefsConfig.reward_model is "reranker"


# ---- the stage functions (one path for the pipeline and the stage commands) ---------------------


def make_twinclips(config, out: Path) -> dict:
    """Generate TwinClips (a `TwinClipsConfig`) into `out`: mp4s + annotations.json."""
    from ..data import load_dataset
    from ..data.twinclips import generate_twinclips

    generate_twinclips(config, out)
    dataset = load_dataset(out)
    return {"videos": len(dataset.videos), "sentences": len(dataset.sentences)}


def make_features(dataset: Dataset, out: Path, config, skip_bad: bool = False) -> dict:
    """Frozen frame features (a `FeatureConfig`) of every video into `out`; with skip_bad an
    unreadable or missing video is listed in out/skipped.jsonl instead of stopping the stage."""
    from ..features import FeatureStore, extract_features

    missing = [v for v in dataset.videos if not dataset.video_path(v).is_file()]
    if missing and not skip_bad:
        v = missing[0]
        more = f" ({len(missing)} videos missing in all)" if len(missing) > 1 else ""
        raise DataError(
            f"{v.source or dataset.root}: video {v.id!r}: no file {dataset.video_path(v)}{more}; "
            "--skip-bad skips missing and unreadable videos"
        )
    store = FeatureStore.load(extract_features(dataset, out, config, skip_bad=skip_bad))
    return {"videos": len(store.ids), "skipped": len(store.meta.get("skipped", []))}


def train_captioner(
    dataset: Dataset, store, out: Path, captioner, sft, resume: bool, log: Callable[[str], None] = print
) -> dict:
    """Projector alignment + SFT of a new captioner (`CaptionerConfig`, `SFTConfig`) into `out`."""
    from ..captioner.model import VideoCaptioner
    from ..captioner.sft import train_sft

    return train_sft(VideoCaptioner(captioner), dataset, store, out, sft, resume=resume, log=log)


def split_ids(dataset: Dataset, store, split: str) -> list[str]:
    """Videos of a split ("all": every split) that have features (store None: all of them)."""
    videos = dataset.videos if split == "all" else dataset.split(split)
    ids = [v.id for v in videos if store is None or v.id in store]
    if not ids:
        raise DataError(f"{dataset.root}: no videos {'' if store is None else 'with features '}in split {split!r}")
    return ids


def write_captions(captioner, store, ids: list[str], out: Path, sampling, visual=None) -> Path:
    """Captions (`SamplingConfig`) of `ids` into the jsonl `out`; resumes, shards under torchrun."""
    from ..captioner.generate import generate_captions

    return generate_captions(captioner, store, ids, out, sampling, visual=visual)


def run_dataset(source: DataSource, seed: int, log: Callable[[str], None] = print) -> Dataset:
    """The data set of a run as every stage and `caredpo eval --run` read it: loaded from `source`,
    with the run's split and query rules applied (`caredpo.data.splits`; each rule applied is logged)."""
    from ..data.splits import prepare

    dataset, notes = prepare(source.load(), seed)
    for note in notes:
        log(note)
    return dataset


def model_dir(path: Path) -> Path:
    """A stage's output folder holding model/ (what from_pretrained reads), or that folder itself."""
    model = TrainerFiles(path).model
    return model if (model / "config.json").exists() else path


def train_one_retriever(
    config,
    dataset: Dataset,
    store,
    out: Path,
    captions: Path | None,
    resume: bool,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Train a retriever (`RetrieverTrainConfig`) into `out`; `captions`: generated captions of the
    training videos (a captions jsonl) added to the auxiliary-caption draws. A finished one is kept."""
    from ..captioner.generate import load_captions
    from ..io import read_json
    from ..retrieval.train import train_retriever

    files = TrainerFiles(out)
    if resume and files.finished:
        return read_json(files.metrics)  # finished earlier
    pool = load_captions(captions) if captions is not None else None
    _, metrics = train_retriever(config, dataset, store, out, caption_pool=pool, resume=resume, log=log)
    return metrics


def first_stage_neighbours(retriever: Path, store, ids: list[str], pool: dict[str, list[str]] | None, n: int = 16):
    """{video id: its n nearest other videos among `ids`} in the retriever's candidate space, each
    candidate with its first generated caption from `pool` (`load_captions`): the rerankers' hard
    negatives."""
    from ..captioner.generate import first_captions
    from ..retrieval.model import Retriever
    from ..retrieval.score import Scorer
    from ..retrieval.search import neighbours

    model = Retriever.from_pretrained(model_dir(retriever)).eval()
    caps = first_captions(pool) if pool is not None and model.config.use_caption else {}
    emb = Scorer(model).candidates(store.global_feats(ids), [caps.get(v) for v in ids] if caps else None)
    return {v: [ids[j] for j in row] for v, row in zip(ids, neighbours(emb, n).tolist())}


def train_one_reranker(
    config,
    captioner: Path | str,
    dataset: Dataset,
    store,
    out: Path,
    first_stage: Path,
    captions: Path | None,
    resume: bool,
    model_path: Path | None = None,
) -> dict:
    """Train a reranker (`RerankerTrainConfig`) from the captioner in `captioner` (or "hf" and a
    Hugging Face video MLLM in `model_path`) into `out`; hard negatives from the retriever in
    `first_stage`, the captions jsonl `captions` mixed into the auxiliary-caption draws. A finished
    one is kept."""
    from ..captioner.base import load_captioner, visual_source
    from ..captioner.generate import load_captions
    from ..io import read_json
    from ..rerank.train import train_reranker

    files = TrainerFiles(out)
    if resume and files.finished:
        return read_json(files.metrics)
    ids = split_ids(dataset, store, config.train_split)
    pool = load_captions(captions) if captions is not None else None
    negatives = first_stage_neighbours(first_stage, store, ids, pool)
    policy = load_captioner(captioner if str(captioner) == "hf" else model_dir(captioner), model_path)
    visual = visual_source(policy, dataset, store)
    _, metrics = train_reranker(config, policy, dataset, visual, out, negatives, pool, resume=resume)
    return metrics


def build_prefs(
    captioner,
    retriever: Path,
    dataset: Dataset,
    store,
    out: Path,
    train_captions: Path,
    config,
    visual=None,
    reranker: Path | None = None,
) -> dict:
    """Preference groups (`PrefsConfig`): K samples of `captioner` (= pi_ref) per training video,
    rewarded by the retriever in `retriever`, or (reward_model "reranker") by the reranker in
    `reranker`; the twins carry their captions from `train_captions`."""
    from ..captioner.generate import first_captions, load_captions
    from ..dpo.prefs import RetrieverReward, build_preferences, summarize
    from ..io import read_jsonl
    from ..retrieval.model import Retriever
    from ..retrieval.score import Scorer

    greedy = first_captions(load_captions(train_captions))
    reward = RetrieverReward(Scorer(Retriever.from_pretrained(model_dir(retriever)).eval()), store)
    if config.reward_model == "reranker":
        from ..captioner.base import visual_source
        from ..rerank.evaluate import RerankerReward
        from ..rerank.model import Reranker

        if reranker is None or not (model_dir(reranker) / "config.json").exists():
            raise DataError(f"reward_model 'reranker' needs a trained reranker folder (got {reranker})")
        rr = Reranker.from_pretrained(model_dir(reranker))
        reward = RerankerReward(rr, visual_source(rr.captioner, dataset, store), reward)
    path = build_preferences(captioner, reward, dataset, store, out, greedy, config, visual=visual)
    return summarize(list(read_jsonl(path)), dataset)


def tune_captioner(policy, groups: Path, features, out: Path, config, resume: bool) -> dict:
    """DG-DPO or plain DPO (`DPOConfig.mode`) of `policy` (the SFT captioner) on the preference
    groups; the tuned captioner is saved to out/model once training finished (rank 0)."""
    from .. import dist
    from ..dpo.train import train_dpo

    if hasattr(policy, "set_trainable"):
        policy.set_trainable()  # projector + LoRA train; the base LM stays frozen
    summary = train_dpo(policy, groups, features, out, config, resume=resume)
    if dist.is_main() and summary["finished"] and hasattr(policy, "save_pretrained"):
        policy.save_pretrained(TrainerFiles(out).model)
    return summary


# ---- `caredpo run`: the stages over one run folder ----------------------------------------------


@dataclass
class RunContext:
    layout: RunLayout
    config: RunConfig
    source: DataSource  # where the data set is and how to read it
    log: Callable[[str], None] = print
    skip_bad: bool = False  # features: list missing and unreadable videos instead of stopping

    @cached_property
    def all_videos(self) -> Dataset:
        """The data set with the run's splits and queries (`data.splits.prepare`), every video."""
        from ..data.splits import check_splits

        return check_splits(run_dataset(self.source, self.config.seed, self.log))

    @cached_property
    def dataset(self) -> Dataset:
        """What the stages after features read: the videos that have features."""
        from ..data.splits import with_features

        return with_features(self.all_videos, self.store.ids, str(self.layout.features))

    @cached_property
    def store(self):
        from ..features import FeatureStore

        return FeatureStore.load(self.layout.features)

    def captioner(self, arm: str):
        from ..captioner.model import VideoCaptioner

        return VideoCaptioner.from_pretrained(self.layout.captioner_model(arm)).eval()


def _data(ctx: RunContext) -> dict:
    return make_twinclips(ctx.config.data, ctx.layout.data)


def _features(ctx: RunContext) -> dict:
    return make_features(ctx.all_videos, ctx.layout.features, ctx.config.features, ctx.skip_bad)


def _sft(ctx: RunContext) -> dict:
    result = train_captioner(
        ctx.dataset,
        ctx.store,
        ctx.layout.captioner("sft"),
        ctx.config.captioner,
        ctx.config.sft,
        resume=True,
        log=ctx.log,
    )
    return {"final_val_loss": result.get("final_val_loss")}


def _train_captions(ctx: RunContext) -> dict:
    """Greedy SFT captions of every training video: the retrievers draw auxiliary captions from
    them (generated_caption_prob), and the twins carry them in the preference stage's reward."""
    ids = split_ids(ctx.dataset, ctx.store, "train")
    write_captions(ctx.captioner("sft"), ctx.store, ids, ctx.layout.captions("sft", "train"), ctx.config.train_captions)
    return {"videos": len(ids)}


def _retrievers(ctx: RunContext) -> dict:
    """Every RETRIEVERS entry; several processes train them side by side, each one alone (so each
    is the one-process retriever)."""
    from .. import dist

    for name in dist.deal(RETRIEVERS):
        with dist.alone():
            train_one_retriever(
                ctx.config.retriever_config(name),
                ctx.dataset,
                ctx.store,
                ctx.layout.retriever(name),
                ctx.layout.captions("sft", "train"),
                resume=True,
                log=ctx.log,
            )
    dist.barrier()
    return {"monitored_t2v_R1": {n: _metrics(ctx.layout.retriever(n)).get("t2v", {}).get("R1") for n in RETRIEVERS}}


def _rerankers(ctx: RunContext) -> dict:
    """Every RERANKERS entry, side by side over the processes as the retrievers."""
    from .. import dist

    if ctx.config.reranker is None:
        return {"skipped": f"preset {ctx.config.preset!r} has no reranker"}
    for name in dist.deal(RERANKERS):
        with dist.alone():
            train_one_reranker(
                ctx.config.reranker_config(name),
                ctx.layout.captioner("sft"),
                ctx.dataset,
                ctx.store,
                ctx.layout.reranker(name),
                ctx.layout.retriever(RERANKERS[name][1]),
                ctx.layout.captions("sft", "train"),
                resume=True,
            )
    dist.barrier()
    return {"final_list_accuracy": {n: _metrics(ctx.layout.reranker(n)).get("list_accuracy") for n in RERANKERS}}


def _metrics(trainer_dir: Path) -> dict:
    """A finished trainer's metrics.json."""
    from ..io import read_json

    return read_json(TrainerFiles(trainer_dir).metrics)


def _prefs(ctx: RunContext) -> dict:
    return build_prefs(
        ctx.captioner("sft"),
        ctx.layout.retriever(ROLE_RETRIEVER),
        ctx.dataset,
        ctx.store,
        ctx.layout.prefs,
        ctx.layout.captions("sft", "train"),
        ctx.config.prefs,
        reranker=ctx.layout.reranker(REWARD_RERANKER),
    )


def _policy(arm: str) -> Callable[[RunContext], dict]:
    def stage(ctx: RunContext) -> dict:
        stats = tune_captioner(
            ctx.captioner("sft"),
            ctx.layout.groups,
            ctx.store.grid_feats,
            ctx.layout.captioner(arm),
            getattr(ctx.config, arm),
            resume=True,
        )
        return {k: v for k, v in stats.items() if isinstance(v, (int, float, str))}

    stage.__name__ = f"stage_{arm}"
    return stage


def _test_captions(ctx: RunContext) -> dict:
    ids = split_ids(ctx.dataset, ctx.store, "test")
    for arm in TUNED_ARMS:
        write_captions(ctx.captioner(arm), ctx.store, ids, ctx.layout.captions(arm, "test"), ctx.config.test_captions)
    return {"videos": len(ids), "arms": list(TUNED_ARMS)}


def _evaluate(ctx: RunContext) -> dict:
    from .report import evaluate_run

    results = evaluate_run(ctx.layout, ctx.dataset, ctx.store, seed=ctx.config.seed)
    return {"arms": sorted(results)}


# name -> stage, in run order
STAGES: dict[str, Callable[[RunContext], dict]] = {
    "data": _data,
    "features": _features,
    "sft": _sft,
    "train_captions": _train_captions,
    "retrievers": _retrievers,
    "rerankers": _rerankers,
    "prefs": _prefs,
    "dpo": _policy("dpo"),
    "dg_dpo": _policy("dg_dpo"),
    "test_captions": _test_captions,
    "evaluate": _evaluate,
}

# How a stage uses the processes of `torchrun ... caredpo run` (in one process all run alike):
#   every stage not named here: every process runs it and it splits the work itself (SFT and its
#     alignment data-parallel; captions and preference groups sharded by video; retrievers and
#     rerankers dealt out, one process each);
#   "main": rank 0 runs it with all the cores while the others wait;
#   "pair": consecutive stages marked "pair" run side by side, one process each, each alone.
PROCESSES: dict[str, str] = {"data": "main", "features": "main", "evaluate": "main", "dpo": "pair", "dg_dpo": "pair"}
