"""Write captions for a split to a jsonl file, resumably; and a check of stated motion direction.

One row per video: {"video_id", "captions": [n strings], "sampling": {...settings...}}.
Videos are cut into fixed batches over the full id list and batch k is sampled with seed
(seed, k), so a resumed run writes exactly the captions an uninterrupted run would have, and
no video twice. A file made with other sampling settings is refused rather than mixed.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Mapping

from ..io import append_jsonl, read_jsonl
from ..records import DataError


@dataclass(frozen=True)
class SamplingConfig:
    n: int = 1  # captions per video
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass kept when sampling
    max_new_tokens: int = 32
    seed: int = 0  # batch k uses seed * 1_000_003 + k
    batch_videos: int = 16  # videos per generate call (part of the seed scheme, so recorded)

    def __post_init__(self) -> None:
        if self.n < 1 or self.max_new_tokens < 1 or self.batch_videos < 1:
            raise ValueError("SamplingConfig: n, max_new_tokens and batch_videos must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig: need temperature >= 0 and 0 < top_p <= 1, got "
                             f"{self.temperature}, {self.top_p}")


def done_ids(path: Path, sampling: dict) -> set[str]:
    """Video ids already in `path`; refuses a file written with other settings."""
    done = set()
    for i, row in enumerate(read_jsonl(path)):
        if row.get("sampling") != sampling:
            raise DataError(f"{path}: line {i + 1} was written with other sampling settings "
                            f"({row.get('sampling')}); use another output file")
        done.add(row["video_id"])
    return done


def generate_captions(model, store, video_ids: list[str], out_path: str | Path,
                      sampling: SamplingConfig = SamplingConfig(), show_progress: bool = True) -> Path:
    """Caption `video_ids` (features from `store`) into out_path; resumes where it stopped."""
    from ..progress import progress_bar

    out, settings = Path(out_path), asdict(sampling)
    done = done_ids(out, settings)
    B = sampling.batch_videos
    batches = [(k, video_ids[i:i + B]) for k, i in enumerate(range(0, len(video_ids), B))]
    todo = [(k, ids) for k, ids in batches if not set(ids) <= done]
    with progress_bar(transient=not show_progress) as bar:
        task = bar.add_task("captions", total=len(video_ids), completed=len(video_ids) - sum(len(i) for _, i in todo),
                            unit="videos")
        for k, ids in todo:
            caps = model.generate(store.grid_feats(ids), n=sampling.n, temperature=sampling.temperature,
                                  top_p=sampling.top_p, max_new_tokens=sampling.max_new_tokens,
                                  seed=sampling.seed * 1_000_003 + k)
            rows = [{"video_id": v, "captions": c, "sampling": settings} for v, c in zip(ids, caps) if v not in done]
            append_jsonl(out, rows)
            bar.advance(task, len(ids))
    return out


def load_captions(path: str | Path) -> dict[str, list[str]]:
    """video id -> captions, from a captions jsonl."""
    return {row["video_id"]: row["captions"] for row in read_jsonl(path)}


# ------------------------------------------------------------------ motion direction check

# TwinClips motion factor -> phrases that state it (the grammar's verb phrases plus a few synonyms).
# Bare "to the left/right" is left out on purpose: the second object "leaves to the right" too.
DIRECTION_PHRASES: dict[str, tuple[str, ...]] = {
    "left-to-right": ("from left to right", "from the left side to the right side", "slides to the right",
                      "moves to the right", "glides to the right", "travels to the right", "rightward",
                      "rightwards"),
    "right-to-left": ("from right to left", "from the right side to the left side", "slides to the left",
                      "moves to the left", "glides to the left", "travels to the left", "leftward", "leftwards"),
    "up": ("moves up", "rises", "upward", "upwards", "from the bottom to the top", "goes up", "slides up"),
    "down": ("moves down", "falls", "downward", "downwards", "from the top to the bottom", "goes down",
             "slides down", "sinks"),
    "down-right": ("diagonally down to the right", "from the top left to the bottom right"),
    "up-left": ("diagonally up to the left", "from the bottom right to the top left"),
    "up-right": ("diagonally up to the right", "from the bottom left to the top right"),
    "down-left": ("diagonally down to the left", "from the top right to the bottom left"),
    "clockwise": ("clockwise",),
    "anticlockwise": ("anticlockwise", "anti-clockwise", "counterclockwise", "counter-clockwise"),
    "still": ("stays still", "sits still", "does not move", "doesn't move", "stays in one place",
              "stationary", "motionless", "stands still"),
}
# Longest first; a matched phrase is blanked out, so "counterclockwise" is not also "clockwise"
# and "diagonally down to the right" is not also read as something shorter.
_PHRASES = sorted(((p, d) for d, ps in DIRECTION_PHRASES.items() for p in ps), key=lambda x: -len(x[0]))


def stated_directions(caption: str) -> set[str]:
    """The motion directions a caption states (none, one, or contradictory several)."""
    text = " " + re.sub(r"[^a-z' -]+", " ", caption.lower()) + " "
    found = set()
    for phrase, name in _PHRASES:
        if re.search(rf"(?<![a-z-]){re.escape(phrase)}(?![a-z])", text):
            found.add(name)
            text = re.sub(rf"(?<![a-z-]){re.escape(phrase)}(?![a-z])", " | ", text)
    return found


def direction_correct(caption: str, factors: Mapping) -> bool | None:
    """True if the caption states the clip's motion direction and no other; None if the clip's
    factors have no known direction (not a TwinClips clip)."""
    truth = factors.get("motion")
    if truth not in DIRECTION_PHRASES:
        return None
    return stated_directions(caption) == {truth}


def direction_share(rows: Iterable[tuple[str, Mapping]]) -> tuple[float, int]:
    """(share of captions stating the right direction, number judged) over (caption, factors)."""
    verdicts = [v for v in (direction_correct(c, f) for c, f in rows) if v is not None]
    return (sum(verdicts) / len(verdicts) if verdicts else float("nan")), len(verdicts)
