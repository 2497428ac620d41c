"""Supervised fine-tuning of the captioner: next-token loss on every reference sentence of the
training split (generic and specific alike, as MSR-VTT has), with checkpoint/resume and val loss.

A step takes `videos_per_step` videos and `captions_per_video` of each one's sentences, so each
video's prefix (visual tokens + prompt) runs once per step for all its captions. The batch plan is
a pure function of (seed, step): a resumed run sees exactly the batches it would have seen.

A fresh run first aligns the projector alone (`align.py`, `align_steps`; no LM pass), so that SFT
starts from visual tokens the LM can already read.

Under `torchrun --nproc_per_node=N` each process takes whole videos of every step (a contiguous
share, `dist.shard_slice`) and divides its summed token NLL by the step's token count over all
processes, so the summed gradients are the one-process gradient: the same run, N times the cores.
Rank 0 alone writes the log, checkpoints and the model.

Run folder (`caredpo.training`): model/ (the captioner, `VideoCaptioner.from_pretrained`),
checkpoint/ (latest resumable state), align.json (the alignment phase), log.jsonl (train and val
losses), train_config.json, metrics.json (settings and final numbers).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import dist
from ..io import read_json, write_json
from ..records import SENTENCE_POOLS, DataError, Dataset, check_pool
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
    plain,
    restore_weights,
)
from .align import align_projector
from .model import VideoCaptioner

ALIGN_FILE = "align.json"
HINT = "Lower --lr-projector / --lr-lora."


@dataclass(frozen=True)
class SFTConfig:
    steps: int = 150  # optimizer steps
    videos_per_step: int = 8  # distinct videos per batch (each prefix computed once)
    captions_per_video: int = 4  # sentences per video per step, rotating through all of them over epochs
    lr_projector: float = 1e-3  # AdamW learning rate of the projector
    lr_lora: float = 5e-4  # AdamW learning rate of the LoRA adapters
    weight_decay: float = 0.0
    warmup_steps: int = 10  # linear warmup, then cosine decay to 10% of the peak (training.SCHEDULES)
    grad_clip: float = 1.0  # max global grad norm (0 = off)
    train_projector: bool = True
    train_lora: bool = True
    val_fraction: float = 0.05  # twin groups held out for val loss when the data has no "val" split
    val_videos: int = 32  # at most this many val videos (all their sentences) per val pass
    val_every: int = 50  # steps between val passes (0 = only at the end)
    save_every: int = 50  # steps between checkpoints (0 = only at the end)
    align_steps: int = 250  # projector alignment steps before SFT (align.py; 0 = off; not redone on resume)
    align_lr: float = 1e-3  # AdamW learning rate of the projector during alignment
    align_batch_videos: int = 64  # videos per alignment step
    sentences: str = "all"  # SFT (and alignment) targets: "all" sentences or "specific" (records.SENTENCE_POOLS)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "videos_per_step", "captions_per_video", "align_batch_videos"):
            if getattr(self, name) < 1:
                raise ValueError(f"SFTConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "warmup_steps",
            "grad_clip",
            "val_videos",
            "val_every",
            "save_every",
            "weight_decay",
            "align_steps",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"SFTConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"SFTConfig.val_fraction must be in [0, 1), got {self.val_fraction}")
        check_pool(self.sentences, "SFTConfig.sentences")
        if not (self.train_projector or self.train_lora):
            raise ValueError("SFTConfig: nothing to train (train_projector and train_lora are both off)")


# ------------------------------------------------------------------ data


def split_train_val(dataset: Dataset, ids_with_features, cfg: SFTConfig) -> tuple[list[str], list[str]]:
    """Train and val video ids (with features and sentences). Val: the "val" split if any, else
    whole twin groups of the train split (so no twin of a val clip is trained on)."""
    usable = [v for v in dataset.videos if v.id in ids_with_features and dataset.sentences_of(v.id)]
    train = [v for v in usable if v.split == "train"]
    val = [v.id for v in usable if v.split == "val"]
    if not train:
        raise DataError(f"{dataset.root}: no training videos with features and sentences")
    if val or cfg.val_fraction == 0:
        return [v.id for v in train], val
    groups = sorted({dataset.group_key(v.id) for v in train})
    random.Random(cfg.seed).shuffle(groups)
    held = set(groups[: max(1, round(cfg.val_fraction * len(groups)))]) if len(groups) > 1 else set()
    keys = {v.id: dataset.group_key(v.id) for v in train}
    return [v for v, g in keys.items() if g not in held], [v for v, g in keys.items() if g in held]


def local_share(vids: list[str], caps: list[str]) -> tuple[list[str], list[str]]:
    """This process's rows of a step: its contiguous share of the step's distinct videos, each with
    all its captions (a video's prefix runs in one process only). World size 1: everything."""
    order = list(dict.fromkeys(vids))
    mine = set(order[dist.shard_slice(len(order))])
    rows = [i for i, v in enumerate(vids) if v in mine]
    return [vids[i] for i in rows], [caps[i] for i in rows]


def batch_at(step: int, train_ids: list[str], sentences: dict[str, list[str]], cfg: SFTConfig):
    """(video ids, captions) of a step: deterministic in (seed, step)."""
    per_epoch = max(1, len(train_ids) // cfg.videos_per_step)
    epoch, k = divmod(step, per_epoch)
    order = list(train_ids)
    random.Random(f"{cfg.seed}-{epoch}").shuffle(order)
    vids, caps = [], []
    for vid in order[k * cfg.videos_per_step : (k + 1) * cfg.videos_per_step]:
        sents = list(sentences[vid])
        random.Random(f"{cfg.seed}-{vid}").shuffle(sents)  # fixed per video; epochs rotate through it
        m = min(cfg.captions_per_video, len(sents))
        for j in range(m):
            vids.append(vid)
            caps.append(sents[(epoch * m + j) % len(sents)])
    return vids, caps


# ------------------------------------------------------------------ optimisation


def make_optimizer(model: VideoCaptioner, cfg: SFTConfig):
    """AdamW on the projector and LoRA groups, linear warm-up then cosine to 10%."""
    model.set_trainable(projector=cfg.train_projector, lora=cfg.train_lora)
    groups = [
        {"params": [p for p in model.projector.parameters() if p.requires_grad], "lr": cfg.lr_projector},
        {"params": [p for n, p in model.lm.named_parameters() if p.requires_grad], "lr": cfg.lr_lora},
    ]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=cfg.weight_decay)
    return opt, lr_schedule(opt, "cosine", cfg.warmup_steps, cfg.steps)


def train_step(
    model: VideoCaptioner,
    feats: torch.Tensor,
    caps: list[str],
    opt,
    sched,
    cfg: SFTConfig,
    step: int,
    checkpoint: Checkpoint,
) -> float:
    """One update on this process's rows (`local_share`); returns the whole step's mean token NLL.
    A NaN/inf loss or gradient norm stops the run before the update (`check_finite`)."""
    model.train()
    lp, mask = model.token_logprobs(feats, caps)
    tokens = dist.all_reduce_sum(mask.sum().float())  # the step's caption tokens, every process
    loss = -lp.sum() / tokens  # this process's share of the step's mean NLL
    whole = dist.all_reduce_sum(loss.detach().clone())
    check_finite(whole, "loss", step + 1, checkpoint, "captioner SFT", HINT)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    params = model.trainable_parameters()
    dist.all_reduce_grads(params, average=False)  # summed shares = the one-process gradient
    norm = clip_gradients(params, cfg.grad_clip)
    check_finite(norm, "gradient norm", step + 1, checkpoint, "captioner SFT", HINT)
    opt.step()
    sched.step()
    return float(whole)


@torch.no_grad()
def val_loss(
    model: VideoCaptioner, store, val_ids: list[str], sentences: dict[str, list[str]], videos_per_batch: int = 8
) -> float:
    """Mean token NLL over all sentences of the val videos (each process scores its share)."""
    model.eval()
    mine = val_ids[dist.shard_slice(len(val_ids))]
    sums = torch.zeros(2, dtype=torch.float64)  # summed NLL, tokens
    for i in range(0, len(mine), videos_per_batch):
        chunk = mine[i : i + videos_per_batch]
        vids = [v for v in chunk for _ in sentences[v]]
        caps = [s for v in chunk for s in sentences[v]]
        lp, mask = model.token_logprobs(store.grid_feats(vids), caps)
        sums += torch.tensor([-float(lp.sum()), int(mask.sum())], dtype=torch.float64)
    total, count = dist.all_reduce_sum(sums).tolist()
    return total / max(count, 1)


def run_weights(model: VideoCaptioner) -> dict[str, torch.Tensor]:
    """What alignment and SFT change, for the checkpoint: projector and LoRA tensors (in place)."""
    return {n: t for n, t in model.state_dict().items() if n.startswith("projector.") or "lora_" in n}


# ------------------------------------------------------------------ the loop


def train_sft(
    model: VideoCaptioner,
    dataset: Dataset,
    store,
    out_dir: str | Path,
    cfg: SFTConfig = SFTConfig(),
    resume: bool = False,
    show_progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Fine-tune `model` in place; writes out_dir/{model,checkpoint,log.jsonl,train_config.json,metrics.json}."""
    out = Path(out_dir)
    train_ids, val_ids = split_train_val(dataset, set(store.ids), cfg)
    sentences = {v: SENTENCE_POOLS[cfg.sentences](dataset, v) for v in train_ids + val_ids}
    val_ids = val_ids[: cfg.val_videos]
    meta = plain(
        {
            "sft": asdict(cfg),
            "captioner": asdict(model.config),
            "data": str(dataset.root),
            "train_videos": len(train_ids),
            "val_videos": len(val_ids),
        }
    )
    if dist.world_size() > cfg.videos_per_step:
        raise DataError(
            f"videos_per_step={cfg.videos_per_step} is below the {dist.world_size()} processes: "
            "each step's videos are split over them; raise --videos-per-step"
        )
    main = dist.is_main()
    start = begin(out, resume, main=main)
    dist.broadcast_tensors(run_weights(model).values())  # every process starts from rank 0's weights
    if start is None:  # a fresh start; the checkpoint of a resumed run already holds the aligned projector
        _align(model, store, sentences, train_ids, out, cfg, show_progress and main)
    if main:
        write_json(out / CONFIG_FILE, asdict(cfg))
    opt, sched = make_optimizer(model, cfg)
    ckpt = Checkpoint(out)
    if start is not None:
        start, weights = ckpt.load(meta, opt, sched)
        restore_weights(run_weights(model), weights, ckpt.path)
        log(f"resumed from {ckpt.path} at step {start}")
    t0 = time.perf_counter()
    plan = (train_ids, val_ids, sentences)
    last_val = _loop(model, store, plan, opt, sched, cfg, start or 0, ckpt, meta, show_progress and main)
    result = {
        **meta,
        "align": read_json(out / ALIGN_FILE) if (out / ALIGN_FILE).exists() else None,
        "steps_done": cfg.steps,
        "final_val_loss": last_val,
        "processes": dist.world_size(),
        "seconds_this_run": round(time.perf_counter() - t0, 1),
    }
    if main:
        model.save_pretrained(out / "model")
        write_json(out / SUMMARY_FILE, result)
    dist.barrier()  # the model folder exists for every process on return
    return result


def _align(model: VideoCaptioner, store, sentences, train_ids, out: Path, cfg: SFTConfig, show_progress: bool) -> None:
    if dist.is_main():
        (out / ALIGN_FILE).unlink(missing_ok=True)
    if cfg.align_steps:
        summary = align_projector(
            model,
            store,
            sentences,
            train_ids,
            cfg.align_steps,
            cfg.align_lr,
            cfg.align_batch_videos,
            cfg.seed,
            show_progress,
        )
        if dist.is_main():
            write_json(out / ALIGN_FILE, summary)


def _loop(
    model, store, plan, opt, sched, cfg: SFTConfig, start: int, ckpt: Checkpoint, meta: dict, show_progress: bool
) -> float | None:
    """Steps start..cfg.steps: log rows, val passes, checkpoints. Returns the last val loss."""
    from rich.progress import TextColumn

    from ..progress import progress_bar

    train_ids, val_ids, sentences = plan
    metrics, last_val = MetricsLog(ckpt.path.parent), None
    with progress_bar(TextColumn("loss {task.fields[loss]}"), show=show_progress) as bar:
        task = bar.add_task("captioner sft", total=cfg.steps, completed=start, unit="steps", loss="--")
        for step in range(start, cfg.steps):
            vids, caps = local_share(*batch_at(step, train_ids, sentences, cfg))
            loss = train_step(model, store.grid_feats(vids), caps, opt, sched, cfg, step, ckpt)
            row = {"step": step + 1, "loss": round(loss, 5), "lr": sched.get_last_lr()[0]}
            done = step + 1 == cfg.steps
            if val_ids and (due(cfg.val_every, step + 1) or done):
                last_val = row["val_loss"] = round(val_loss(model, store, val_ids, sentences), 5)
            if dist.is_main():  # rank 0 alone writes the log and checkpoints
                metrics.append(row)
                if due(cfg.save_every, step + 1) or done:
                    ckpt.save(step + 1, meta, run_weights(model), opt, sched)
            bar.update(task, advance=1, loss=f"{loss:.3f}" + (f" val {last_val:.3f}" if last_val else ""))
    return last_val
