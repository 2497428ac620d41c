"""Preference pairs of the preference stage for other DPO tools: a Hugging Face `datasets` folder.

    export_pairs("RUN/prefs/groups.jsonl", load_dataset("RUN/data"), "RUN/prefs/trl")
    pairs = datasets.load_from_disk("RUN/prefs/trl")   # trl.DPOTrainer(train_dataset=pairs, ...)

One row per (winner, loser) pair of a video's caption group, chosen by the same rule as our loss
(`caredpo.dpo.loss.pair_mask`: every pair with r_w - r_l > margin, or best-vs-worst only).
Columns:

    prompt, chosen, rejected      trl's preference columns. Standard format: the captioner's
                                  instruction + "\\n" and the two captions as sampled (trl appends
                                  EOS); conversational=True: one user / assistant message each
    video_id, video_path, group   which clip the captions describe (path: the data set's file)
    chosen_reward, rejected_reward        r(c | v), the retrieval reward of the preference stage
    chosen_ref_logp, rejected_ref_logp    log pi_ref(c | video, prompt) of the SFT captioner,
                                          summed over the caption tokens and EOS

The reference log-probs are conditioned on the video, so they are not trl's `ref_*_logps`
columns (those hold a text-only reference's log-probs; trl computes them itself). The video
group (the best caption under its own video vs its twins) has no place in a prompt / chosen /
rejected row and is not exported: a tool trained on these rows runs plain DPO over caption pairs.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from ..records import DataError, Dataset
from .loss import pair_mask
from .train import load_groups

PAIR_COLUMNS = ("prompt", "chosen", "rejected")  # trl's preference format


def pair_indices(rewards: list[float], margin: float = 0.0, pairs: str = "all") -> list[tuple[int, int]]:
    """(winner, loser) caption indices of one video, in row-major order of the loss's pair mask."""
    mask = pair_mask(torch.tensor([rewards], dtype=torch.float64), margin, pairs)[0]  # [K, K]
    return [(int(w), int(lo)) for w, lo in mask.nonzero().tolist()]


def pair_rows(
    row: Mapping, dataset: Dataset, prompt: str, margin: float = 0.0, pairs: str = "all", conversational: bool = False
) -> Iterator[dict]:
    """The export rows of one preference-group row (a video and its K rewarded captions)."""
    vid = row["video_id"]
    if vid not in dataset.by_id:
        raise DataError(f"{dataset.root}: preference row names unknown video {vid!r}")
    caps, rewards, ref = row["captions"], row["rewards"], row["ref_logps"]
    for w, lo in pair_indices(rewards, margin, pairs):
        yield {
            **_texts(prompt, caps[w], caps[lo], conversational),
            "video_id": vid,
            "video_path": str(dataset.video_path(dataset.by_id[vid])),
            "group": row.get("group"),
            "chosen_reward": float(rewards[w]),
            "rejected_reward": float(rewards[lo]),
            "chosen_ref_logp": float(ref[w]),
            "rejected_ref_logp": float(ref[lo]),
        }


def _texts(prompt: str, chosen: str, rejected: str, conversational: bool) -> dict:
    """trl's prompt / chosen / rejected, standard (strings) or conversational (message lists)."""
    if not conversational:
        # "\n" ends the prompt as in the captioner's plain format, so a caption starts a new line
        return {"prompt": prompt + "\n", "chosen": chosen, "rejected": rejected}
    say = lambda role, text: [{"role": role, "content": text}]  # noqa: E731
    return {"prompt": say("user", prompt), "chosen": say("assistant", chosen), "rejected": say("assistant", rejected)}


def export_pairs(
    groups: str | Path,
    dataset: Dataset,
    out_dir: str | Path,
    prompt: str | None = None,
    margin: float = 0.0,
    pairs: str = "all",
    conversational: bool = False,
) -> Path:
    """Write the pairs of a groups.jsonl as a `datasets` folder (`save_to_disk`); returns out_dir.

    prompt: the captioner's instruction (default: `CaptionerConfig.prompt`, what our captioner and
    the HF backend ask). The folder is written beside and then moved into place, replacing an
    older export, so a reader never sees half of one."""
    from datasets import Dataset as HFDataset

    from ..captioner.model import CaptionerConfig

    prompt = CaptionerConfig().prompt if prompt is None else prompt
    rows = [r for row in load_groups(groups) for r in pair_rows(row, dataset, prompt, margin, pairs, conversational)]
    if not rows:
        raise DataError(f"{groups}: no preference pairs (every video's rewards lie within margin={margin})")
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with _quiet_datasets():
        HFDataset.from_list(rows).save_to_disk(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


@contextlib.contextmanager
def _quiet_datasets():
    """No `datasets` progress bar for a write of a few hundred rows; the caller's setting after."""
    import datasets

    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was:
            datasets.enable_progress_bars()
