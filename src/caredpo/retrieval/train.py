"""Retriever training: symmetric InfoNCE on batches of whole twin groups, checkpoint and resume.

Each training item is (query sentence of v, features of v, auxiliary caption of v). The caption is
drawn from v's *other* reference sentences plus, when given, its generated captions, so the model
learns to use a caption exactly as far as it is informative (generic sentences say little, specific
ones a lot). The query sentence itself is never its auxiliary caption, and only training videos are
used, so no test query can be an auxiliary caption.

Batches and draws are a pure function of (seed, epoch, step): a resumed run sees the same data.

Under `torchrun` (see `caredpo.dist`) every process draws the same global batch, encodes its
contiguous share, and all-gathers the embeddings with gradient, so each process's InfoNCE runs over
the whole batch (all negatives); averaged gradients then equal one process's on the same batch.
Only rank 0 evaluates and writes logs, checkpoints and the model.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .. import dist
from ..io import write_json
from ..records import SENTENCE_POOLS, TWIN_GROUP_SIZE, DataError, Dataset, check_pool
from ..training import (
    CONFIG_FILE,
    SUMMARY_FILE,
    Checkpoint,
    MetricsLog,
    begin,
    check_finite,
    clip_gradients,
    due,
    lr_schedule,
    restore_weights,
)
from .loss import info_nce
from .model import Retriever, RetrieverConfig
from .score import GlobalFeatures, evaluate, reference_captions

HINT = "Lower the learning rates (lr, head_lr)."


@dataclass(frozen=True)
class RetrieverTrainConfig:
    model: RetrieverConfig = field(default_factory=RetrieverConfig)  # architecture and variant
    epochs: int = 4  # passes over the training videos (one query per video per pass)
    # twin groups per batch (8 x 4 clips = 32 pairs; twins are the hard negatives); on data without
    # twin groups 4 lone videos per group (records.TWIN_GROUP_SIZE)
    batch_groups: int = 8
    lr: float = 5e-5  # AdamW lr of the pretrained encoder layers that train
    head_lr: float = 1e-3  # AdamW lr of the new parts: video projection, role table, frame positions, scale
    weight_decay: float = 0.01
    warmup_steps: int = 10  # linear warm-up, then constant
    grad_clip: float = 1.0  # max global grad norm (0: off)
    max_steps: int = 0  # stop after this many steps (0: epochs decide)
    no_caption_prob: float = 0.0  # share of training items shown without any caption
    # The draw (see `draw_pairs`). Queries and reference captions come from SENTENCE_POOLS: "all"
    # sentences, or "specific" ones (those that can tell twins apart; all sentences on data sets
    # that do not mark specificity). generated_caption_prob: share of captioned items whose caption
    # is one of the video's generated captions (the rest get another reference sentence); None
    # draws uniformly over both together (the "uniform" recipe).
    query_sentences: str = "all"
    caption_sentences: str = "all"
    generated_caption_prob: float | None = None
    train_split: str = "train"
    eval_split: str = "test"  # monitored only: no model selection, the last step is the model
    eval_every: int = 0  # steps between evaluations (0: only at the end)
    save_every: int = 50  # steps between checkpoints (0: only at the end)
    seed: int = 0
    device: str = "cpu"  # torch device of the model ("cuda" where there is one)
    dropout: bool = True  # encoder dropout while training; False: any world size gives the same weights

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_groups < 1:
            raise ValueError("epochs and batch_groups must be >= 1")
        if self.lr <= 0 or self.head_lr <= 0:
            raise ValueError("lr and head_lr must be > 0")
        if min(self.warmup_steps, self.max_steps, self.eval_every, self.save_every) < 0:
            raise ValueError("warmup_steps, max_steps, eval_every, save_every must be >= 0")
        if not 0 <= self.no_caption_prob <= 1:
            raise ValueError("no_caption_prob must be in [0, 1]")
        check_pool(self.query_sentences, "RetrieverTrainConfig.query_sentences")
        check_pool(self.caption_sentences, "RetrieverTrainConfig.caption_sentences")
        if self.generated_caption_prob is not None and not 0 <= self.generated_caption_prob <= 1:
            raise ValueError("generated_caption_prob must be None or in [0, 1]")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RetrieverTrainConfig:
        d = dict(d)
        d["model"] = RetrieverConfig.from_dict(d.get("model", {}))
        return cls(**d)


# preset name -> overrides. smoke: tiny random encoder, seconds. default: MiniLM, a few minutes.
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(
        model=RetrieverConfig(text_encoder="tiny", train_layers=-1),
        epochs=8,
        batch_groups=2,
        lr=3e-3,
        head_lr=3e-3,
        warmup_steps=2,
        save_every=0,
        query_sentences="specific",
        caption_sentences="specific",
        generated_caption_prob=0.25,
    ),
    # The fine-grained recipe: queries that can tell twins apart, auxiliary captions that are other
    # specific reference sentences (reading their details pays) or, with generated_caption_prob,
    # the video's generated captions (right or wrong: the model learns how far to trust one), whole
    # encoder, 200 steps of 8 twin groups a batch (at 100 steps oracle captions did not yet separate
    # twins on every seed). docs/results.md has the sweep.
    # 48 tokens: a quarter of TwinClips specific sentences are longer than 32, and their events
    # come last. video_shortcut: a direct video path for the no-caption arm (model.py).
    "default": dict(
        model=RetrieverConfig(
            text_encoder="minilm",
            train_layers=-1,
            video_shortcut=True,
            max_query_tokens=48,
            max_caption_tokens=48,
            precision="auto",
        ),
        max_steps=200,
        batch_groups=8,
        lr=1e-4,
        query_sentences="specific",
        caption_sentences="specific",
        generated_caption_prob=0.25,
    ),
    # The recipe before it (for comparison): queries and captions drawn uniformly from all 8
    # sentences of mixed specificity and the generated captions, top 2 layers, 50 steps.
    "default-uniform": dict(
        model=RetrieverConfig(text_encoder="minilm", train_layers=2, video_shortcut=True, max_query_tokens=48),
        epochs=2,
        batch_groups=8,
        lr=1e-4,
    ),
}


def preset(name: str, **overrides: Any) -> RetrieverTrainConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return replace(RetrieverTrainConfig(**PRESETS[name]), **overrides)


# ---- data ------------------------------------------------------------------------------------


def units_per_batch(dataset: Dataset, video_ids: Sequence[str], batch_groups: int) -> int:
    """Work units (`Dataset.units`) in a batch: batch_groups twin groups, or, on data without twin
    groups, TWIN_GROUP_SIZE lone videos for each (the batch keeps its size in videos)."""
    return batch_groups if dataset.has_twin_groups(video_ids) else batch_groups * TWIN_GROUP_SIZE


def epoch_batches(units: list[list[str]], per_batch: int, seed: int, epoch: int) -> list[list[str]]:
    """Video ids per step of an epoch: the units in a seeded order, `per_batch` whole units a batch."""
    order = list(range(len(units)))
    random.Random(f"{seed}-{epoch}").shuffle(order)
    return [[v for g in order[i : i + per_batch] for v in units[g]] for i in range(0, len(order), per_batch)]


def draw_pairs(
    dataset: Dataset,
    batch: list[str],
    pool: Mapping[str, list[str]] | None,
    cfg: RetrieverTrainConfig,
    rng: random.Random,
) -> tuple[list[str], list[str | None]]:
    """(query per video, auxiliary caption per video); the caption is never the query text.

    With generated_caption_prob = p, a captioned item carries one of the video's generated
    captions with probability p (right or wrong about the details: the model must learn how far
    to trust one) and another reference sentence otherwise (so reading the details pays)."""
    queries, captions = [], []
    for v in batch:
        q = rng.choice(SENTENCE_POOLS[cfg.query_sentences](dataset, v))
        refs = [s for s in SENTENCE_POOLS[cfg.caption_sentences](dataset, v) if s != q]
        generated = [c for c in (pool or {}).get(v, []) if c != q]
        queries.append(q)
        if cfg.generated_caption_prob is None:  # uniform over both
            options = refs + generated
            captions.append(rng.choice(options) if options and rng.random() >= cfg.no_caption_prob else None)
        elif rng.random() < cfg.no_caption_prob or not (refs or generated):
            captions.append(None)
        else:
            use_generated = bool(generated) and (not refs or rng.random() < cfg.generated_caption_prob)
            captions.append(rng.choice(generated if use_generated else refs))
    return queries, captions


def _train_ids(dataset: Dataset, features: GlobalFeatures, split: str) -> list[str]:
    have = set(getattr(features, "ids", None) or [])
    vids = [v.id for v in dataset.split(split) if dataset.sentences_of(v.id) and (not have or v.id in have)]
    if not vids:
        raise DataError(f"{dataset.root}: no {split!r} videos with sentences and features")
    return vids


# ---- optimisation ----------------------------------------------------------------------------


def make_optimizer(model: Retriever, cfg: RetrieverTrainConfig) -> torch.optim.AdamW:
    enc = [p for p in model.encoder.parameters() if p.requires_grad]
    enc_ids = {id(p) for p in model.encoder.parameters()}
    head = [p for p in model.parameters() if p.requires_grad and id(p) not in enc_ids]
    groups = [dict(params=head, lr=cfg.head_lr, weight_decay=0.0)]
    if enc:
        groups.append(dict(params=enc, lr=cfg.lr, weight_decay=cfg.weight_decay))
    return torch.optim.AdamW(groups)


def make_schedule(opt: torch.optim.Optimizer, cfg: RetrieverTrainConfig):
    """Linear warm-up of every group's lr, then constant (training.SCHEDULES)."""
    return lr_schedule(opt, "constant", cfg.warmup_steps)


def train_step(
    model: Retriever,
    opt: torch.optim.Optimizer,
    sched,
    cfg: RetrieverTrainConfig,
    queries: list[str],
    feats: torch.Tensor,
    captions: list[str | None],
    step: int,
    checkpoint: Checkpoint | None = None,
) -> float:
    """One step on the global batch (queries, feats, captions); under torchrun each process encodes
    its share and the loss, the same on every process, covers the gathered whole (so a NaN/inf
    loss or gradient norm stops every process before the update)."""
    model.train(cfg.dropout)
    q, c, scale = _batch_embeddings(model, queries, feats, captions if model.config.use_caption else None)
    loss = info_nce(q, c, scale)
    check_finite(loss.detach(), "loss", step + 1, checkpoint, "retriever", HINT)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    dist.all_reduce_grads(params, average=True)  # no-op in one process
    check_finite(clip_gradients(params, cfg.grad_clip), "gradient norm", step + 1, checkpoint, "retriever", HINT)
    opt.step()
    sched.step()
    return float(loss.detach())


def _batch_embeddings(
    model: Retriever, queries: list[str], feats: torch.Tensor, captions: list[str | None] | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(query [B, H], candidate [B, H], scale) of the global batch; rows of other processes are
    gathered with gradient (their backward all-reduces, see `dist.gather_with_grad`)."""
    if dist.world_size() == 1:
        return model(queries, feats, captions)
    mine = dist.shard_slice(len(queries))
    if mine.stop > mine.start:
        q, c, scale = model(queries[mine], feats[mine], captions[mine] if captions is not None else None)
        both = torch.cat([q, c], dim=1)  # one gather for both sides: [b, 2H]
    else:  # fewer items than processes: an empty share still takes part in the gather's backward
        scale = model.logit_scale()
        both = torch.zeros(0, 2 * model.hidden_size, device=scale.device, requires_grad=True)
    both = dist.gather_with_grad(both, dist.shard_sizes(len(queries)))
    return *both.split(model.hidden_size, dim=1), scale


def resume_guard(cfg: RetrieverTrainConfig) -> dict:
    """What a resumed run must share with the checkpoint: the model config."""
    return {"model": asdict(cfg.model)}


# ---- loop ------------------------------------------------------------------------------------


def _loss_column():
    from rich.progress import TextColumn

    return TextColumn("loss {task.fields[loss]}")


def train_retriever(
    cfg: RetrieverTrainConfig,
    dataset: Dataset,
    features: GlobalFeatures,
    out_dir: str | Path,
    caption_pool: Mapping[str, list[str]] | None = None,
    resume: bool = False,
    eval_captions: Mapping[str, str | None] | None = None,
    log: Callable[[str], None] | None = None,
    progress: bool = True,
) -> tuple[Retriever, dict]:
    """Train, writing out_dir/{log.jsonl, checkpoint/, model/, metrics.json, train_config.json}
    (`caredpo.training`); returns (model, metrics).

    caption_pool: optional {video id: [generated captions]} added to the auxiliary-caption draws.
    eval_captions: captions for the monitored evaluation; default: oracle reference captions
    (never the query) for captioned variants.
    """
    out = Path(out_dir)
    start = begin(out, resume, main=dist.is_main())
    if dist.is_main():
        write_json(out / CONFIG_FILE, asdict(cfg))
    model, opt, sched, step = _start(cfg, Checkpoint(out), start)
    ids = _train_ids(dataset, features, cfg.train_split)
    feats = dict(zip(ids, features.global_feats(ids)))
    groups = dataset.units(ids)
    per_batch = units_per_batch(dataset, ids, cfg.batch_groups)
    per_epoch = math.ceil(len(groups) / per_batch)
    total = cfg.max_steps or per_epoch * cfg.epochs
    if eval_captions is None and cfg.model.use_caption:
        eval_captions = reference_captions(dataset, cfg.eval_split, seed=cfg.seed)
    emit = (log if dist.is_main() else None) or (lambda s: None)
    emit(
        f"retriever {cfg.model.variant} ({cfg.model.video_pooling} pooling): {len(ids)} videos, {len(groups)} groups, {total} steps"
        + (f", resuming at step {step}" if step else "")
        + (f", {dist.world_size()} processes" if dist.world_size() > 1 else "")
    )

    def batches(epoch: int) -> list[list[str]]:
        return epoch_batches(groups, per_batch, cfg.seed, epoch)

    metrics = _loop(
        cfg,
        model,
        (opt, sched),
        dataset,
        features,
        feats,
        batches,
        caption_pool,
        eval_captions,
        step,
        total,
        per_epoch,
        out,
        emit,
        progress and dist.is_main(),
    )
    if dist.is_main():
        model.save_pretrained(out / "model")
        write_json(out / SUMMARY_FILE, metrics)
    dist.barrier()  # the model folder exists for every process on return
    return model, metrics


def _start(cfg: RetrieverTrainConfig, ckpt: Checkpoint, start: int | None):
    """(model, optimizer, scheduler, step): fresh from cfg.seed, or the checkpoint's state."""
    torch.manual_seed(cfg.seed)
    model = Retriever(cfg.model).to(dist.device(cfg.device))
    opt = make_optimizer(model, cfg)
    sched = make_schedule(opt, cfg)
    if start is not None:  # after .to(device): the optimizer state follows the parameters
        start, weights = ckpt.load(resume_guard(cfg), opt, sched)
        restore_weights(model.state_dict(), weights, ckpt.path)
    dist.broadcast_tensors([*model.parameters(), *model.buffers()])  # every process starts from rank 0's
    return model, opt, sched, start or 0


def _loop(
    cfg,
    model,
    optim,
    dataset,
    features,
    feats,
    batches,
    pool,
    eval_captions,
    step,
    total,
    per_epoch,
    out,
    emit,
    progress,
) -> dict:
    from ..progress import progress_bar

    (opt, sched), ckpt, metrics_log = optim, Checkpoint(out), MetricsLog(out)
    metrics: dict = {}
    with progress_bar(_loss_column(), show=progress) as bar:
        task = bar.add_task("retriever", total=total, completed=step, unit="step", loss="-")
        while step < total:
            epoch, k = divmod(step, per_epoch)
            batch = batches(epoch)[k]
            rng = random.Random(f"{cfg.seed}-draw-{step}")
            queries, captions = draw_pairs(dataset, batch, pool, cfg, rng)
            loss = train_step(
                model, opt, sched, cfg, queries, torch.stack([feats[v] for v in batch]), captions, step, ckpt
            )
            step += 1
            bar.update(task, advance=1, loss=f"{loss:.3f}")
            if not dist.is_main():  # rank 0 alone evaluates and writes; the others go on to the next step
                continue
            metrics_log.append({"step": step, "epoch": epoch, "loss": loss})
            if due(cfg.eval_every, step) or step == total:
                metrics = evaluate(model, dataset, features, eval_captions, cfg.eval_split)
                metrics["step"] = step
                metrics_log.append({"step": step, "eval": metrics})
                emit(
                    f"step {step}: {cfg.eval_split} t2v R1 {metrics['t2v']['R1']:.1f} "
                    f"R5 {metrics['t2v']['R5']:.1f} twin {metrics['twin_acc']:.1f}"
                )
            if due(cfg.save_every, step) or step == total:
                ckpt.save(step, resume_guard(cfg), model.state_dict(), opt, sched)
    return metrics


__all__ = ["RetrieverTrainConfig", "preset", "train_retriever", "units_per_batch", "draw_pairs"]
