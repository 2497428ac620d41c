"""Supervised fine-tuning of the captioner: next-token loss on every reference sentence of the
training split (generic and specific alike, as MSR-VTT has), with checkpoint/resume and val loss.

A step takes `videos_per_step` videos and `captions_per_video` of each one's sentences, so each
video's prefix (visual tokens + prompt) runs once per step for all its captions. The batch plan is
a pure function of (seed, step): a resumed run sees exactly the batches it would have seen.

A fresh run first aligns the projector alone (`align.py`, `align_steps`; no LM pass), so that SFT
starts from visual tokens the LM can already read.

Run folder:  model/ (the captioner, `VideoCaptioner.from_pretrained`), checkpoint/ (latest
resumable state), align.json (the alignment phase), sft_log.jsonl (train and val losses), sft.json
(settings and final numbers).
"""
from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from ..io import append_jsonl, read_json, write_json
from ..records import SENTENCE_POOLS, DataError, Dataset, NonFiniteLossError, check_pool
from .align import align_projector
from .model import VideoCaptioner, _replace_dir


@dataclass(frozen=True)
class SFTConfig:
    steps: int = 150  # optimizer steps
    videos_per_step: int = 8  # distinct videos per batch (each prefix computed once)
    captions_per_video: int = 4  # sentences per video per step, rotating through all of them over epochs
    lr_projector: float = 1e-3  # AdamW learning rate of the projector
    lr_lora: float = 5e-4  # AdamW learning rate of the LoRA adapters
    weight_decay: float = 0.0
    warmup_steps: int = 10  # linear warmup, then cosine decay to 10% of the peak
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
        for name in ("warmup_steps", "grad_clip", "val_videos", "val_every", "save_every", "weight_decay",
                     "align_steps"):
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


def batch_at(step: int, train_ids: list[str], sentences: dict[str, list[str]], cfg: SFTConfig):
    """(video ids, captions) of a step: deterministic in (seed, step)."""
    per_epoch = max(1, len(train_ids) // cfg.videos_per_step)
    epoch, k = divmod(step, per_epoch)
    order = list(train_ids)
    random.Random(f"{cfg.seed}-{epoch}").shuffle(order)
    vids, caps = [], []
    for vid in order[k * cfg.videos_per_step:(k + 1) * cfg.videos_per_step]:
        sents = list(sentences[vid])
        random.Random(f"{cfg.seed}-{vid}").shuffle(sents)  # fixed per video; epochs rotate through it
        m = min(cfg.captions_per_video, len(sents))
        for j in range(m):
            vids.append(vid)
            caps.append(sents[(epoch * m + j) % len(sents)])
    return vids, caps


# ------------------------------------------------------------------ optimisation

def make_optimizer(model: VideoCaptioner, cfg: SFTConfig):
    model.set_trainable(projector=cfg.train_projector, lora=cfg.train_lora)
    groups = [{"params": [p for p in model.projector.parameters() if p.requires_grad], "lr": cfg.lr_projector},
              {"params": [p for n, p in model.lm.named_parameters() if p.requires_grad], "lr": cfg.lr_lora}]
    groups = [g for g in groups if g["params"]]
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)

    def factor(step: int) -> float:  # linear warmup, cosine to 10%
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_step(model: VideoCaptioner, feats: torch.Tensor, caps: list[str], opt, sched, cfg: SFTConfig) -> float:
    model.train()
    loss = model.nll(feats, caps)
    if not torch.isfinite(loss):
        raise NonFiniteLossError(f"captioner SFT: non-finite loss ({float(loss.detach())}); stopped before the "
                                 "update, the last checkpoint is kept. Lower --lr-projector / --lr-lora.")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), cfg.grad_clip)
    opt.step()
    sched.step()
    return float(loss.detach())


@torch.no_grad()
def val_loss(model: VideoCaptioner, store, val_ids: list[str], sentences: dict[str, list[str]],
             videos_per_batch: int = 8) -> float:
    """Mean token NLL over all sentences of the val videos."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(val_ids), videos_per_batch):
        chunk = val_ids[i:i + videos_per_batch]
        vids = [v for v in chunk for _ in sentences[v]]
        caps = [s for v in chunk for s in sentences[v]]
        lp, mask = model.token_logprobs(store.grid_feats(vids), caps)
        total, count = total - float(lp.sum()), count + int(mask.sum())
    return total / max(count, 1)


# ------------------------------------------------------------------ checkpoints

def save_checkpoint(path: Path, model: VideoCaptioner, opt, sched, step: int, meta: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp / "model")
    torch.save({"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "torch_rng": torch.get_rng_state()}, tmp / "trainer.pt")
    write_json(tmp / "meta.json", meta)
    _replace_dir(tmp, path)


def load_checkpoint(path: Path, model: VideoCaptioner, opt, sched, meta: dict) -> int:
    """Restore weights + optimizer; refuses a checkpoint made with other settings."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    old = read_json(path / "meta.json")
    if old != meta:
        raise DataError(f"{path}: checkpoint was made with other settings; start without --resume "
                        "or use another --out")
    model.projector.load_state_dict(load_file(str(path / "model" / "projector.safetensors")))
    if (path / "model" / "adapter").exists():
        set_peft_model_state_dict(model.lm, load_file(str(path / "model" / "adapter" / "adapter_model.safetensors")))
    state = torch.load(path / "trainer.pt", weights_only=False)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"])


# ------------------------------------------------------------------ the loop

def train_sft(model: VideoCaptioner, dataset: Dataset, store, out_dir: str | Path, cfg: SFTConfig = SFTConfig(),
              resume: bool = False, show_progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Fine-tune `model` in place; writes out_dir/{model,checkpoint,sft_log.jsonl,sft.json}."""
    from ..progress import progress_bar
    from rich.progress import TextColumn

    out = Path(out_dir)
    train_ids, val_ids = split_train_val(dataset, set(store.ids), cfg)
    sentences = {v: SENTENCE_POOLS[cfg.sentences](dataset, v) for v in train_ids + val_ids}
    val_ids = val_ids[: cfg.val_videos]
    meta = {"sft": asdict(cfg), "captioner": asdict(model.config), "data": str(dataset.root),
            "train_videos": len(train_ids), "val_videos": len(val_ids)}
    meta = json.loads(json.dumps(meta))  # tuples -> lists, as read back from meta.json
    start, resuming = 0, resume and (out / "checkpoint" / "meta.json").exists()
    if not resuming:  # a fresh start: no stale checkpoint or log lines from an earlier run
        shutil.rmtree(out / "checkpoint", ignore_errors=True)
        (out / "sft_log.jsonl").unlink(missing_ok=True)
        (out / "align.json").unlink(missing_ok=True)
        if cfg.align_steps:  # the checkpoint of a resumed run already holds the aligned projector
            write_json(out / "align.json", align_projector(
                model, store, sentences, train_ids, cfg.align_steps, cfg.align_lr, cfg.align_batch_videos,
                cfg.seed, show_progress))
    opt, sched = make_optimizer(model, cfg)
    if resuming:
        start = load_checkpoint(out / "checkpoint", model, opt, sched, meta)
        log(f"resumed from {out / 'checkpoint'} at step {start}")
    t0, last_val = time.perf_counter(), None
    with progress_bar(TextColumn("loss {task.fields[loss]}"), transient=not show_progress) as bar:
        task = bar.add_task("captioner sft", total=cfg.steps, completed=start, unit="steps", loss="--")
        for step in range(start, cfg.steps):
            vids, caps = batch_at(step, train_ids, sentences, cfg)
            loss = train_step(model, store.grid_feats(vids), caps, opt, sched, cfg)
            row = {"step": step + 1, "loss": round(loss, 5), "lr": sched.get_last_lr()[0]}
            done = step + 1 == cfg.steps
            if val_ids and ((cfg.val_every and (step + 1) % cfg.val_every == 0) or done):
                last_val = row["val_loss"] = round(val_loss(model, store, val_ids, sentences), 5)
            append_jsonl(out / "sft_log.jsonl", [row])
            if (cfg.save_every and (step + 1) % cfg.save_every == 0) or done:
                save_checkpoint(out / "checkpoint", model, opt, sched, step + 1, meta)
            bar.update(task, advance=1, loss=f"{loss:.3f}" + (f" val {last_val:.3f}" if last_val else ""))
    model.save_pretrained(out / "model")
    result = {**meta, "align": read_json(out / "align.json") if (out / "align.json").exists() else None,
              "steps_done": cfg.steps, "final_val_loss": last_val,
              "seconds_this_run": round(time.perf_counter() - t0, 1)}
    write_json(out / "sft.json", result)
    return result
