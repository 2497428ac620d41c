"""Write captions for a split to a jsonl file, resumably (checks of what they state: factors.py).

One row per video: {"video_id", "captions": [n strings], "sampling": {...settings...}}.
Video v samples with its own seed `video_seed(seed, v)`, so its captions do not depend on the
batch it lands in, the id list, or the number of processes. Videos are cut into fixed batches over
the full id list; a resumed run writes exactly the captions an uninterrupted run would have, and
no video twice. A file made with other sampling settings is refused rather than mixed.

Under torchrun the batches are dealt round-robin to the processes; each appends to its own part
file (OUT.part<rank>, resumable the same way) and rank 0 merges the parts into OUT, in id order,
once every process is done (`caredpo.io.merge_parts`). A killed job rerun with any number of
processes generates only the missing videos.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import dist
from ..io import append_jsonl, merge_parts, numbered_jsonl, part_path, part_paths
from ..records import DataError

# a captions.jsonl line: {"video_id": str, "captions": [str, ...], "sampling": {...}}
CAPTION_FIELDS = {"video_id": str, "captions": list}


@dataclass(frozen=True)
class SamplingConfig:
    # captions per video (under torchrun write --num-captions: torchrun claims --n)
    n: int = field(default=1, metadata={"flags": ("--num-captions",)})
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass kept when sampling
    max_new_tokens: int = 32  # longest caption, in tokens
    seed: int = 0  # video v samples with video_seed(seed, v)
    batch_videos: int = 16  # videos per generate call (the unit of resume and of sharding)

    def __post_init__(self) -> None:
        if self.n < 1 or self.max_new_tokens < 1 or self.batch_videos < 1:
            raise ValueError("SamplingConfig: n, max_new_tokens and batch_videos must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(
                f"SamplingConfig: need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}"
            )


def done_ids(path: Path, sampling: dict) -> set[str]:
    """Video ids already in `path`; refuses a file written with other settings."""
    done = set()
    for n, row in numbered_jsonl(path, CAPTION_FIELDS):
        if row.get("sampling") != sampling:
            raise DataError(
                f"{path}:{n}: written with other sampling settings ({row.get('sampling')}); use another output file"
            )
        done.add(row["video_id"])
    return done


def video_seed(seed: int, video_id: str) -> int:
    """The sampling seed of one video: a 63-bit hash of (seed, video id)."""
    digest = hashlib.blake2b(f"{seed}\0{video_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def generate_captions(
    model,
    store,
    video_ids: list[str],
    out_path: str | Path,
    sampling: SamplingConfig = SamplingConfig(),
    show_progress: bool = True,
    visual: Callable[[Sequence[str]], Any] | None = None,
) -> Path:
    """Caption `video_ids` (features from `store`) into out_path; resumes where it stopped.
    Under torchrun: sharded over the processes, merged by rank 0 (every process returns after).
    visual: ids -> the model's visual input (default `store.grid_feats`; HF MLLMs take frames)."""
    visual = visual or store.grid_feats
    out, settings = Path(out_path), asdict(sampling)
    parts = part_paths(out)
    if dist.world_size() == 1 and not parts:  # one process, no shards left over: append to OUT itself
        _caption_batches(model, visual, video_ids, out, sampling, done_ids(out, settings), show_progress)
        return out
    done = done_ids(out, settings).union(*(done_ids(p, settings) for p in parts))
    _caption_batches(model, visual, video_ids, part_path(out, dist.rank()), sampling, done, show_progress)
    dist.barrier()
    if dist.is_main():
        merge_parts(out, video_ids)
    dist.barrier()
    return out


def _caption_batches(
    model, visual, video_ids: list[str], target: Path, sampling: SamplingConfig, done: set[str], show_progress: bool
) -> None:
    """This process's fixed batches (every world_size-th), appended to target, skipping done ids."""
    from ..progress import progress_bar

    settings, B = asdict(sampling), sampling.batch_videos
    batches = [video_ids[i : i + B] for i in range(0, len(video_ids), B)][dist.rank() :: dist.world_size()]
    todo = [ids for ids in batches if not set(ids) <= done]
    total = sum(map(len, batches))
    with progress_bar(show=show_progress) as bar:
        task = bar.add_task("captions", total=total, completed=total - sum(map(len, todo)), unit="videos")
        for ids in todo:
            caps = _sample(model, visual(ids), [video_seed(sampling.seed, v) for v in ids], sampling)
            rows = [{"video_id": v, "captions": c, "sampling": settings} for v, c in zip(ids, caps) if v not in done]
            append_jsonl(target, rows)
            bar.advance(task, len(ids))


def _sample(model, feats, seeds: Sequence[int], sampling: SamplingConfig) -> list[list[str]]:
    """One generate call with a seed per video; a backend without per-video seeds gets one call a
    video, so its captions are the same whatever the batch."""
    kw = dict(
        n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p, max_new_tokens=sampling.max_new_tokens
    )
    if getattr(model, "seeds_per_video", False):
        return model.generate(feats, seed=list(seeds), **kw)
    return [model.generate(feats[i : i + 1], seed=s, **kw)[0] for i, s in enumerate(seeds)]


def load_captions(path: str | Path) -> dict[str, list[str]]:
    """video id -> captions, from a captions jsonl (the one reader of generated captions: the
    retrievers' pool, the twins' captions in the reward, the arms' captions in the evaluation).

    Every line must hold a "video_id" string and a "captions" list of strings; another line fails
    with one `DataError` "FILE:LINE: reason". Captions are kept as written, blank ones too: a
    captioner that writes nothing for a video is what the retriever is trained and evaluated with."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: captions file not found")
    out: dict[str, list[str]] = {}
    for n, row in numbered_jsonl(path, CAPTION_FIELDS):
        if not all(isinstance(c, str) for c in row["captions"]):
            raise DataError(f'{path}:{n}: field "captions" must be a list of strings')
        out.setdefault(row["video_id"], []).extend(row["captions"])
    return out


def first_captions(captions: dict[str, list[str]]) -> dict[str, str | None]:
    """The first caption of each video (None where it has none): the one the evaluation and the
    twins in the reward use."""
    return {v: (caps[0] if caps else None) for v, caps in captions.items()}
