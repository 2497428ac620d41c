"""TwinClips: the generated default data set (docs/design.md, "The embedded data set: TwinClips").

Each twin group is 4 clips that share background, shape, colour(s) and size and differ only in
time. The 4 twins are the product of two binary *tracks*, each a pair of time-reversed variants:

    kind     track A (2 variants)                  track B (2 variants)
    reverse  motion direction (L->R / R->L, ...)   one event, forward / reversed
                                                   (turns blue / turns red, grows / shrinks,
                                                    enters / leaves, vanishes / appears)
    order    motion direction                      two brief events, X then Y / Y then X
    still    a second object enters / leaves       two brief events, X then Y / Y then X

Time reversal keeps each track's multiset of states (positions, colours, scales), and brief
events sit in windows symmetric about the middle, so the frame-averaged appearance of the 4 twins
is nearly identical: a mean over frames cannot tell them apart, their order can.

    generate_twinclips(TwinClipsConfig.preset("smoke"), Path("data/tc"))  # writes mp4s + json
    ds = load_twinclips("data/tc")                                        # -> records.Dataset
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..io import read_json, write_json
from ..records import DataError, Dataset, Sentence, Video
from . import render
from .grammar import describe

GENERATOR = "caredpo.data.twinclips"
VERSION = "1"
SPLIT_KEYS = {"train": 0, "test": 1}  # rng stream per split: adding test groups keeps train fixed
KIND_P = {"reverse": 0.45, "order": 0.35, "still": 0.2}
AXIS_P = {"horizontal": 0.3, "vertical": 0.25, "diagonal": 0.2, "circle": 0.25}
PERSISTENT = ("colour_change", "grow", "enter", "vanish")
BRIEF = ("hop", "blink", "flash", "pulse")
WINDOWS = ((0.15, 0.4), (0.6, 0.85))  # brief-event windows, mirror images about u = 0.5


@dataclass(frozen=True)
class TwinClipsConfig:
    train_groups: int  # twin groups (of 4 clips) in the train split
    test_groups: int  # twin groups in the test split (one query sentence per test clip)
    frames: int = 16  # frames per clip
    size: int = 128  # frame side in pixels (square, even: yuv420p needs it)
    fps: int = 8  # frame rate written into the mp4 (16 frames at 8 fps = a 2 s clip)
    sentences_per_clip: int = 8  # reference sentences per clip, mixed specificity
    seed: int = 0  # everything (factors, textures, sentences) follows from this

    def __post_init__(self) -> None:
        if self.train_groups < 1 or self.test_groups < 1:
            raise ValueError("train_groups and test_groups must be >= 1")
        if self.frames < 4:
            raise ValueError(f"frames must be >= 4 (events need time), got {self.frames}")
        if self.size < 32 or self.size % 2 or self.size > 1024:
            raise ValueError(f"size must be even and in [32, 1024], got {self.size}")
        if not 1 <= self.fps <= 120:
            raise ValueError(f"fps must be in [1, 120], got {self.fps}")
        if self.sentences_per_clip < 3:
            raise ValueError("sentences_per_clip must be >= 3 (generic, medium, specific)")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    @classmethod
    def preset(cls, name: str, seed: int = 0) -> TwinClipsConfig:
        """ "smoke": 6 + 3 groups (36 clips, 64 px) for tests; "default": 500 + 50 groups."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(seed=seed, **PRESETS[name])


PRESETS = {
    "smoke": dict(train_groups=6, test_groups=3, frames=16, size=64),
    "default": dict(train_groups=500, test_groups=50, frames=16, size=128),
}


@dataclass(frozen=True)
class ClipPlan:
    video_id: str
    split: str
    group: str
    factors: dict = field(hash=False)


# ----------------------------------------------------------------------------- planning


def _pick(rng: np.random.Generator, options):
    """One of `options` (a sequence, or a dict option -> probability)."""
    p = list(options.values()) if isinstance(options, dict) else None
    options = list(options)
    return options[int(rng.choice(len(options), p=p))]


def _motion_track(rng, size_name: str, scale_max: float, hop: bool) -> list[dict]:
    """Two variants of one path, the second the time reversal of the first."""
    r = render.SIZES[size_name] * scale_max
    side = r + 0.03
    top, bottom = side + (render.HOP if hop else 0.0), side
    axis, speed = _pick(rng, AXIS_P), _pick(rng, ("slow", "fast"))
    if axis == "circle":
        return _circle_track(rng, side, top, bottom, speed)
    frac = 1.0 if speed == "fast" else 0.5  # a slow object covers half the distance

    def span(lo, hi):  # the [a, b] a path of this speed covers inside [lo, hi]
        length = (hi - lo) * frac
        a = rng.uniform(lo, hi - length) if frac < 1 else lo
        return a, a + length

    x0, x1 = span(side, 1 - side)
    y0, y1 = span(top, 1 - bottom)
    xm, ym = rng.uniform(max(side, 0.3), min(1 - side, 0.7)), rng.uniform(max(top, 0.3), min(1 - bottom, 0.7))
    lines = {
        "horizontal": [("left-to-right", (x0, ym), (x1, ym))],
        "vertical": [("down", (xm, y0), (xm, y1))],
        "diagonal": [("down-right", (x0, y0), (x1, y1)), ("up-right", (x0, y1), (x1, y0))],
    }[axis]
    name, a, b = lines[int(rng.integers(len(lines)))]
    rev = {"left-to-right": "right-to-left", "down": "up", "down-right": "up-left", "up-right": "down-left"}
    return [_line_variant(name, a, b, speed), _line_variant(rev[name], b, a, speed)]


def _line_variant(motion, start, end, speed):
    path = {"kind": "line", "start": [round(float(v), 4) for v in start], "end": [round(float(v), 4) for v in end]}
    return {"motion": motion, "speed": speed, "path": path}


def _circle_track(rng, side, top, bottom, speed) -> list[dict]:
    cy = (top + 1 - bottom) / 2
    radius = round(float(min((1 - bottom - top) / 2, 0.5 - side, 0.3)), 4)
    sweep = 2 * np.pi if speed == "fast" else np.pi  # a slow object goes half way round
    a0 = float(rng.uniform(0, 2 * np.pi))
    centre = [0.5, round(float(cy), 4)]

    def variant(motion, start, sw):
        path = {
            "kind": "arc",
            "centre": centre,
            "radius": radius,
            "start_angle": round(start, 4),
            "sweep": round(sw, 4),
        }
        return {"motion": motion, "speed": speed, "path": path}

    return [variant("clockwise", a0, sweep), variant("anticlockwise", a0 + sweep, -sweep)]


def _colours_for(background: str, exclude=()) -> list[str]:
    """Colours that stand out on `background` and differ clearly from those in `exclude`."""

    def alike(c):
        return c in exclude or any(frozenset((c, x)) in render.SIMILAR for x in exclude)

    return [c for c in render.COLOURS if c not in render.CLASHES[background] and not alike(c)]


def _persistent_track(rng, base: dict, kind: str) -> list[dict]:
    """One event and its time reversal."""
    c0 = base["colour"]
    if kind == "colour_change":
        c1 = _pick(rng, _colours_for(base["background"], {c0}))
        ev = lambda a, b: {"type": "colour_change", "at": 0.5, "from": a, "to": b}  # noqa: E731
        return [{"colour": c0, "events": [ev(c0, c1)]}, {"colour": c1, "events": [ev(c1, c0)]}]
    if kind == "grow":
        return [{"events": [{"type": t, "start": 0.3, "end": 0.7}]} for t in ("grow", "shrink")]
    if kind == "vanish":
        return [{"events": [{"type": t, "at": 0.5}]} for t in ("vanish", "appear")]
    return _enter_track(rng, base)


def _enter_track(rng, base: dict) -> list[dict]:
    """A second object of another shape and colour slides in from a side / out to it."""
    shape = _pick(rng, [s for s in render.SHAPES if s != base["shape"]])
    colour = _pick(rng, _colours_for(base["background"], {base["colour"]}))
    rest = [_pick(rng, (0.2, 0.8)), _pick(rng, (0.2, 0.8))]
    side = "left" if rest[0] < 0.5 else "right"
    second = {"shape": shape, "colour": colour, "rest": rest, "side": side}
    return [
        {"events": [{"type": "enter", "start": 0.5, "end": 0.8, **second}]},
        {"events": [{"type": "leave", "start": 0.2, "end": 0.5, **second}]},
    ]


def _brief_track(rng, base: dict, pair: tuple[str, str]) -> list[dict]:
    """Two brief events in mirrored windows: X then Y, and Y then X."""
    flash = _pick(rng, _colours_for(base["background"], {base["colour"]}))

    def event(t, window):
        e = {"type": t, "start": window[0], "end": window[1]}
        return {**e, "colour": flash} if t == "flash" else e

    x, y = pair
    return [
        {"events": [event(x, WINDOWS[0]), event(y, WINDOWS[1])]},
        {"events": [event(y, WINDOWS[0]), event(x, WINDOWS[1])]},
    ]


def _tracks_reverse(rng, base):
    event = _pick(rng, PERSISTENT)
    scale = render.GROW if event == "grow" else 1.0
    return _motion_track(rng, base["size"], scale, hop=False), _persistent_track(rng, base, event)


def _tracks_order(rng, base):
    pair = tuple(str(t) for t in rng.choice(BRIEF, size=2, replace=False))
    scale = render.PULSE if "pulse" in pair else 1.0
    motion = _motion_track(rng, base["size"], scale, hop="hop" in pair)
    return motion, _brief_track(rng, base, pair)


def _tracks_still(rng, base):
    pair = tuple(str(t) for t in rng.choice(BRIEF, size=2, replace=False))
    at = [round(float(rng.uniform(0.4, 0.6)), 4), round(float(rng.uniform(0.45, 0.6)), 4)]
    still = {"motion": "still", "speed": None, "path": {"kind": "point", "at": at}}
    enter = [{**still, **v} for v in _enter_track(rng, base)]
    return enter, _brief_track(rng, base, pair)


KINDS = {"reverse": _tracks_reverse, "order": _tracks_order, "still": _tracks_still}


def _event_time(e: dict) -> float:
    return e.get("at", e.get("start", 0.0))


def plan_group(rng: np.random.Generator) -> list[dict]:
    """The factors of one twin group: 4 dicts, shared appearance, different time courses."""
    background = _pick(rng, list(render.BACKGROUNDS))
    base = {
        "background": background,
        "background_seed": int(rng.integers(2**31)),
        "shape": _pick(rng, list(render.SHAPES)),
        "size": _pick(rng, list(render.SIZES)),
        "colour": _pick(rng, _colours_for(background)),
        "kind": _pick(rng, KIND_P),
    }
    track_a, track_b = KINDS[base["kind"]](rng, base)
    twins = []
    for a in track_a:
        for b in track_b:
            events = sorted(a.get("events", []) + b.get("events", []), key=_event_time)
            f = {**base, **{k: v for k, v in {**a, **b}.items() if k != "events"}}
            twins.append({**f, "events": events, "event_order": [e["type"] for e in events]})
    return [twins[i] for i in rng.permutation(4)]  # ids must not give away the variant


def plan_clips(config: TwinClipsConfig) -> list[ClipPlan]:
    """Every clip's id, split, group and factors; cheap and deterministic."""
    plans, n_group = [], 0
    for split, n in (("train", config.train_groups), ("test", config.test_groups)):
        for g in range(n):
            rng = np.random.default_rng([config.seed, SPLIT_KEYS[split], g])
            for factors in plan_group(rng):
                plans.append(ClipPlan(f"tc{len(plans):05d}", split, f"g{n_group:04d}", factors))
            n_group += 1
    return plans


def plan_sentences(config: TwinClipsConfig, plans: list[ClipPlan]) -> list[dict]:
    """~sentences_per_clip per clip; for a test clip, its first specific sentence is the query."""
    rows = []
    for i, p in enumerate(plans):
        rng = np.random.default_rng([config.seed, 2, i])
        sentences = describe(p.factors, rng, config.sentences_per_clip)
        query_at = next(j for j, (_, spec) in enumerate(sentences) if spec == "specific")
        for j, (text, spec) in enumerate(sentences):
            rows.append(
                {
                    "sen_id": len(rows),
                    "video_id": p.video_id,
                    "caption": text,
                    "specificity": spec,
                    "query": p.split == "test" and j == query_at,
                }
            )
    return rows


# ----------------------------------------------------------------------------- writing


def clip_hash(config: TwinClipsConfig, factors: dict) -> str:
    """Identifies what a clip file must contain; stored in the mp4's comment tag for resuming."""
    spec = {
        "v": VERSION,
        "factors": factors,
        "frames": config.frames,
        "size": config.size,
        "fps": config.fps,
        "x264": render.X264_OPTIONS,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def _is_done(path: Path, config: TwinClipsConfig, digest: str) -> bool:
    if not path.exists():
        return False
    try:
        comment, n, width = render.mp4_comment_and_frames(path)
    except Exception:  # unreadable or torn file: write it again
        return False
    return comment == digest and n == config.frames and width == config.size


def write_clip(config: TwinClipsConfig, plan: ClipPlan, out: Path) -> bool:
    """Render and encode one clip unless a valid copy exists. Returns True if it was written."""
    path = out / "videos" / f"{plan.video_id}.mp4"
    digest = clip_hash(config, plan.factors)
    if _is_done(path, config, digest):
        return False
    frames = render.render_clip(plan.factors, config.frames, config.size)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        render.encode_mp4(frames, tmp, config.fps, comment=digest)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return True


def annotations(config: TwinClipsConfig, plans: list[ClipPlan]) -> dict:
    """The MSR-VTT-shaped annotation object (plus group, factors, specificity, query)."""
    videos = [
        {
            "id": i,
            "video_id": p.video_id,
            "video": f"videos/{p.video_id}.mp4",
            "split": p.split,
            "group": p.group,
            "factors": p.factors,
        }
        for i, p in enumerate(plans)
    ]
    info = {
        "generator": GENERATOR,
        "version": VERSION,
        "seed": config.seed,
        "config": asdict(config),
        "description": "TwinClips: twin groups of 4 clips sharing "
        "appearance and differing in motion direction, events and event order",
    }
    return {"info": info, "videos": videos, "sentences": plan_sentences(config, plans)}


def generate_twinclips(config: TwinClipsConfig, out: Path, progress: bool = True, workers: int = 1) -> Path:
    """Write out/videos/<id>.mp4 and out/annotations.json (last, atomically); returns out.

    Resumable: a clip whose file exists, reads, and carries this clip's hash is not redone.
    `workers` > 1 renders and encodes in that many processes (the bytes do not depend on it).
    """
    out = Path(out)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    plans = plan_clips(config)
    ann = annotations(config, plans)  # before any video: a grammar error fails fast
    _write_all(config, plans, out, progress, workers)
    write_json(out / "annotations.json", ann)
    return out


def _write_all(config, plans: list[ClipPlan], out: Path, progress: bool, workers: int) -> None:
    jobs = [(config, p, out) for p in plans]
    with ExitStack() as stack:
        results = map(_write_job, jobs)
        if workers > 1:
            pool = stack.enter_context(ProcessPoolExecutor(max_workers=workers))
            results = pool.map(_write_job, jobs, chunksize=8)
        if not progress:
            for _ in results:
                pass
            return
        from ..progress import progress_bar

        bar = stack.enter_context(progress_bar())
        task = bar.add_task("twinclips", total=len(plans), unit="clips")
        skipped = 0
        for written in results:
            skipped += not written
            bar.update(task, advance=1, description=f"twinclips ({skipped} already there)")


def _write_job(job: tuple) -> bool:
    return write_clip(*job)


# ----------------------------------------------------------------------------- reading


def load_twinclips(path: str | Path) -> Dataset:
    """annotations.json (or its folder) -> Dataset with groups, factors, specificity, queries."""
    path = Path(path)
    file = path / "annotations.json" if path.is_dir() else path
    ann = read_json(file)
    try:
        videos = [
            Video(v["video_id"], v["video"], v["split"], v.get("group"), v.get("factors", {})) for v in ann["videos"]
        ]
        sentences = [Sentence(s["video_id"], s["caption"], s.get("specificity")) for s in ann["sentences"]]
        queries: dict[str, list[str]] = {}
        for s in ann["sentences"]:
            if s.get("query"):
                queries.setdefault(s["video_id"], []).append(s["caption"])
    except (KeyError, TypeError) as e:
        raise DataError(f"{file}: not a TwinClips annotation file (missing {e})") from None
    ds = Dataset(file.parent, videos, sentences, queries, name="twinclips")
    _check_queries(file, ds)
    return ds


def _check_queries(file: Path, ds: Dataset) -> None:
    for v in ds.split("test"):
        if len(ds.queries.get(v.id, [])) != 1:
            raise DataError(f"{file}: test video {v.id!r} needs exactly one query sentence")
    extra = set(ds.queries) - {v.id for v in ds.split("test")}
    if extra:
        raise DataError(f"{file}: query sentences for non-test video {sorted(extra)[0]!r}")
