"""Reranker training: a listwise softmax over each query's candidate list, checkpoint and resume.

A step takes `units_per_step` work units (twin groups on TwinClips). The queries of a unit (one
discriminative sentence per video) share one candidate list: the unit's own videos (each query's
positive and the others' hardest negatives) and `candidates - len(unit)` first-stage hard negatives
(the bi-encoder's nearest training videos outside the unit; random ones without a first stage).
Every candidate carries an auxiliary caption drawn as the retriever draws it (`retrieval.train.
draw_pairs`): another reference sentence of that video, or one of its generated captions with
`generated_caption_prob`, never the query it is the positive for. So each candidate's prefix
[visual][caption] runs once and is extended with the unit's queries (`Reranker.score_pairs`).

The data of a step is a pure function of (seed, step), so a resumed run sees the same lists.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..io import write_json
from ..records import SENTENCE_POOLS, DataError, Dataset, check_pool
from ..retrieval.train import epoch_batches
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
from .loss import listwise_loss
from .model import Reranker, RerankerConfig

HINT = "Lower the learning rates (lr, head_lr)."


@dataclass(frozen=True)
class RerankerTrainConfig:
    model: RerankerConfig = field(default_factory=RerankerConfig)  # variant, score, prompt, precision
    steps: int = 100  # optimizer steps
    units_per_step: int = 2  # work units (twin groups) a step; their queries share a candidate list
    candidates: int = 8  # list length per unit: its own videos + first-stage hard negatives
    query_sentences: str = "specific"  # SENTENCE_POOLS key of the queries (discriminative ones)
    caption_sentences: str = "specific"  # SENTENCE_POOLS key of reference auxiliary captions
    generated_caption_prob: float = 0.25  # share of candidates captioned by a generated caption
    temperature: float = 1.0  # of the listwise softmax
    lr: float = 2e-4  # AdamW lr of the LoRA weights
    head_lr: float = 1e-3  # AdamW lr of the role table and the linear head
    warmup_steps: int = 5
    grad_clip: float = 1.0  # max global grad norm (0: off)
    save_every: int = 25  # steps between checkpoints (0: only at the end)
    train_split: str = "train"
    seed: int = 0
    k: int = 16  # first-stage top k the reranker re-orders at evaluation (rerank/two_stage.py)

    def __post_init__(self) -> None:
        if min(self.steps, self.units_per_step, self.candidates, self.k) < 1:
            raise ValueError("RerankerTrainConfig: steps, units_per_step, candidates and k must be >= 1")
        if min(self.warmup_steps, self.save_every) < 0:
            raise ValueError("RerankerTrainConfig: warmup_steps and save_every must be >= 0")
        if self.lr <= 0 or self.head_lr <= 0 or self.temperature <= 0:
            raise ValueError("RerankerTrainConfig: lr, head_lr and temperature must be > 0")
        if not 0 <= self.generated_caption_prob <= 1:
            raise ValueError("RerankerTrainConfig.generated_caption_prob must be in [0, 1]")
        check_pool(self.query_sentences, "RerankerTrainConfig.query_sentences")
        check_pool(self.caption_sentences, "RerankerTrainConfig.caption_sentences")


# ---- data ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnitList:
    """One unit's share of a step: its queries rank one candidate list."""

    queries: list[str]  # one per video of the unit
    positives: list[int]  # query i's own video: candidates[positives[i]]
    candidates: list[str]  # video ids
    captions: list[str | None]  # one auxiliary caption per candidate


def unit_list(
    dataset: Dataset,
    unit: list[str],
    pool_ids: Sequence[str],
    negatives: Mapping[str, list[str]] | None,
    captions: Mapping[str, list[str]] | None,
    cfg: RerankerTrainConfig,
    rng: random.Random,
) -> UnitList:
    queries = [rng.choice(SENTENCE_POOLS[cfg.query_sentences](dataset, v)) for v in unit]
    hard = [n for v in unit for n in (negatives or {}).get(v, []) if n not in unit]
    others = list(dict.fromkeys(hard))[: cfg.candidates - len(unit)]
    while len(others) < cfg.candidates - len(unit) and len(others) + len(unit) < len(pool_ids):
        v = rng.choice(pool_ids)
        if v not in unit and v not in others:
            others.append(v)
    cands = list(unit) + others
    banned = dict(zip(unit, queries))
    caps = [_draw_caption(dataset, v, banned.get(v), captions, cfg, rng) for v in cands]
    return UnitList(queries, list(range(len(unit))), cands, caps)


def _draw_caption(dataset, video: str, query: str | None, pool, cfg: RerankerTrainConfig, rng) -> str | None:
    """Another reference sentence, or (generated_caption_prob) a generated caption; never `query`."""
    refs = [s for s in SENTENCE_POOLS[cfg.caption_sentences](dataset, video) if s != query]
    generated = [c for c in (pool or {}).get(video, []) if c != query]
    use_generated = bool(generated) and (not refs or rng.random() < cfg.generated_caption_prob)
    options = generated if use_generated else refs
    return rng.choice(options) if options else None


def step_units(units: list[list[str]], cfg: RerankerTrainConfig, step: int) -> list[list[str]]:
    """The units of `step`: a seeded order of all units per pass, `units_per_step` at a time."""
    per_epoch = max(1, len(units) // cfg.units_per_step)
    epoch, k = divmod(step, per_epoch)
    order = epoch_batches(units, 1, cfg.seed, epoch)  # the retriever's seeded order, one unit a batch
    return order[k * cfg.units_per_step : (k + 1) * cfg.units_per_step]


# ---- step ------------------------------------------------------------------------------------


def list_scores(model: Reranker, lists: Sequence[UnitList], visual: Callable[[list[str]], torch.Tensor]):
    """Scores [Q, L] (L = the longest list), mask [Q, L] and positives [Q] of a step's lists, from
    one `score_pairs` call: every candidate's prefix once, extended by its unit's queries."""
    videos, caps, queries, cand, rows = [], [], [], [], []
    for ul in lists:
        base = len(videos)
        videos += ul.candidates
        caps += ul.captions
        for q in ul.queries:
            rows.append(len(ul.candidates))
            queries += [q] * len(ul.candidates)
            cand += range(base, base + len(ul.candidates))
    flat = model.score_pairs(visual(videos), caps, queries, torch.tensor(cand))
    L = max(rows)
    scores = torch.zeros(len(rows), L, device=flat.device)
    mask = (torch.arange(L)[None] < torch.tensor(rows)[:, None]).to(flat.device)
    scores[mask] = flat
    positives = torch.tensor([p for ul in lists for p in ul.positives])
    return scores, mask, positives.to(flat.device)


def make_optimizer(model: Reranker, cfg: RerankerTrainConfig) -> torch.optim.AdamW:
    lm = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("captioner.")]
    new = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("captioner.")]
    groups = [dict(params=lm, lr=cfg.lr)] + ([dict(params=new, lr=cfg.head_lr)] if new else [])
    return torch.optim.AdamW(groups, weight_decay=0.0)


def trained_state(model: Reranker) -> dict[str, torch.Tensor]:
    """The tensors a step changes (what the checkpoint keeps)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# ---- loop ------------------------------------------------------------------------------------


def train_reranker(
    cfg: RerankerTrainConfig,
    captioner,
    dataset: Dataset,
    visual: Callable[[list[str]], torch.Tensor],
    out_dir: str | Path,
    negatives: Mapping[str, list[str]] | None = None,
    caption_pool: Mapping[str, list[str]] | None = None,
    resume: bool = False,
    progress: bool = True,
) -> tuple[Reranker, dict]:
    """Train a reranker starting from `captioner` (usually the SFT one; our `VideoCaptioner` or an
    `HFVideoCaptioner`), writing out_dir/{log.jsonl, checkpoint/, model/, metrics.json,
    train_config.json}; returns (model, metrics). visual: video ids -> the captioner's visual input
    (`captioner.base.visual_source`).

    negatives: {video id: training videos ranked by the first stage} (hard negatives);
    caption_pool: {video id: generated captions} mixed into the auxiliary-caption draws."""
    from ..progress import progress_bar

    out = Path(out_dir)
    start = begin(out, resume)
    write_json(out / CONFIG_FILE, asdict(cfg))
    model = Reranker(cfg.model, captioner)
    model.set_trainable()
    opt = make_optimizer(model, cfg)
    sched = lr_schedule(opt, "constant", cfg.warmup_steps)
    ckpt, log = Checkpoint(out), MetricsLog(out)
    guard = {"model": asdict(cfg.model), "units_per_step": cfg.units_per_step, "candidates": cfg.candidates}
    step = 0
    if start is not None:
        step, weights = ckpt.load(guard, opt, sched)
        restore_weights(trained_state(model), weights, ckpt.path)
    ids = [v.id for v in dataset.split(cfg.train_split) if dataset.sentences_of(v.id)]
    if not ids:
        raise DataError(f"{dataset.root}: no {cfg.train_split!r} videos with sentences")
    units = dataset.units(ids)
    metrics: dict = log.rows()[-1] if step else {}  # a finished run resumed: its last step's numbers
    with progress_bar(show=progress) as bar:
        task = bar.add_task("reranker", total=cfg.steps, completed=step, unit="step")
        while step < cfg.steps:
            rng = random.Random(f"{cfg.seed}-lists-{step}")
            lists = [
                unit_list(dataset, u, ids, negatives, caption_pool, cfg, rng) for u in step_units(units, cfg, step)
            ]
            model.train()
            scores, mask, pos = list_scores(model, lists, visual)
            loss = listwise_loss(scores, pos, mask, cfg.temperature)
            check_finite(loss.detach(), "loss", step + 1, ckpt, "reranker", HINT)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norm = clip_gradients(model.trainable_parameters(), cfg.grad_clip)
            check_finite(norm, "gradient norm", step + 1, ckpt, "reranker", HINT)
            opt.step()
            sched.step()
            step += 1
            acc = float((scores.detach().masked_fill(~mask, float("-inf")).argmax(1) == pos).float().mean())
            metrics = {"step": step, "loss": float(loss.detach()), "list_accuracy": acc}
            log.append(metrics)
            bar.update(task, advance=1)
            if due(cfg.save_every, step) or step == cfg.steps:
                ckpt.save(step, guard, trained_state(model), opt, sched)
    model.eval()
    model.save_pretrained(out / "model")
    write_json(out / SUMMARY_FILE, metrics)
    return model, metrics
