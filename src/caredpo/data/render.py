"""TwinClips frame rendering and mp4 encoding: numpy only, vectorised over frames.

`render_clip(factors, frames, size)` is a pure function of a clip's generating factors (the dict
stored in annotations.json), so anyone can re-render a clip from its annotation. Coordinates are
fractions of the frame side, x to the right and y *down* (image convention), so a positive arc
sweep is clockwise on screen. Time is u = i / (T - 1) in [0, 1].
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import av
import numpy as np

# name -> RGB. Object colours; backgrounds below avoid the ones that would blend in.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (40, 190, 70),
    "blue": (35, 75, 225),
    "yellow": (245, 225, 35),
    "orange": (250, 135, 15),
    "purple": (145, 45, 200),
    "white": (248, 248, 248),
    "black": (20, 20, 20),
    "pink": (255, 115, 185),
    "cyan": (30, 215, 225),
}
SIZES = {"small": 0.13, "large": 0.19}  # object radius as a fraction of the frame side
SECOND_RADIUS = 0.1  # the second object (enter / leave events)
GROW = 1.45  # scale reached by grow / left by shrink
PULSE = 1.35  # peak scale of a pulse
HOP = 0.1  # height of a hop (bounce), fraction of the frame side
OUTLINE = 0.35  # outline colour = OUTLINE * fill colour: keeps objects visible on any texture


# ----------------------------------------------------------------------------- backgrounds


def _value_noise(rng: np.random.Generator, size: int, cells_y: int, cells_x: int) -> np.ndarray:
    """Smooth noise in [0, 1]: a random (cells+1)^2 grid, bilinearly upsampled. -> [S, S]."""
    grid = rng.random((cells_y + 1, cells_x + 1))
    ys, xs = np.linspace(0, cells_y, size), np.linspace(0, cells_x, size)
    y0 = np.minimum(ys.astype(int), cells_y - 1)
    x0 = np.minimum(xs.astype(int), cells_x - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bot = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bot * fy


def _fbm(rng: np.random.Generator, size: int, octaves=(4, 8, 16)) -> np.ndarray:
    """Fractal noise in about [-0.5, 0.5] -> [S, S]."""
    out = sum(_value_noise(rng, size, c, c) / (i + 1) for i, c in enumerate(octaves))
    return out / sum(1 / (i + 1) for i in range(len(octaves))) - 0.5


def _tint(base, shade: np.ndarray) -> np.ndarray:
    """base RGB * (1 + shade) -> float [S, S, 3]."""
    return np.asarray(base, np.float32)[None, None, :] * (1.0 + shade[..., None])


def _grass(rng, s):
    blades = _value_noise(rng, s, 3, max(4, s // 3)) - 0.5  # vertical streaks
    return _tint((70, 140, 45), 0.45 * _fbm(rng, s) + 0.5 * blades)


def _sand(rng, s):
    y = np.arange(s)[:, None] / s
    ripples = np.sin(2 * np.pi * (5 * y + 0.6 * _value_noise(rng, s, 3, 3)))
    grain = rng.random((s, s)) - 0.5
    return _tint((215, 185, 135), 0.07 * ripples + 0.12 * grain + 0.2 * _fbm(rng, s))


def _water(rng, s):
    y = np.arange(s)[:, None] / s
    waves = np.sin(2 * np.pi * (7 * y + 0.8 * _value_noise(rng, s, 2, 5)))
    return _tint((40, 105, 165), 0.25 * waves + 0.3 * _fbm(rng, s))


def _brick(rng, s):
    rows, cols = 7, 4
    y, x = np.mgrid[0:s, 0:s] / s
    row = np.floor(y * rows).astype(int)
    xs = x * cols + 0.5 * (row % 2)  # every other row shifted by half a brick
    brick_id = row * (cols + 1) + np.floor(xs).astype(int)
    per_brick = rng.uniform(-0.15, 0.15, brick_id.max() + 1)[brick_id]
    mortar = (np.abs(y * rows - np.round(y * rows)) < 0.06) | (np.abs(xs - np.round(xs)) < 0.03)
    img = _tint((165, 65, 45), per_brick + 0.25 * _fbm(rng, s, (8, 16, 32)))
    img[mortar] = (195, 190, 180)
    return img


def _snow(rng, s):
    return _tint((232, 238, 246), 0.06 * _fbm(rng, s) + 0.03 * (rng.random((s, s)) - 0.5))


def _wood(rng, s):
    x = np.arange(s)[None, :] / s
    grain = np.sin(2 * np.pi * (9 * x + 1.5 * _value_noise(rng, s, 6, 2)))
    return _tint((150, 98, 52), 0.18 * grain + 0.15 * _fbm(rng, s))


def _asphalt(rng, s):
    return _tint((92, 92, 98), 0.35 * (rng.random((s, s)) - 0.5) + 0.25 * _fbm(rng, s))


def _tiles(rng, s):
    n = 4
    y, x = np.mgrid[0:s, 0:s] / s * n
    checker = ((np.floor(y) + np.floor(x)) % 2).astype(np.float32)
    img = _tint((205, 205, 215), -0.35 * checker + 0.08 * _fbm(rng, s))
    grout = (np.abs(y - np.round(y)) < 0.04) | (np.abs(x - np.round(x)) < 0.04)
    img[grout] = (90, 90, 90)
    return img


BACKGROUNDS = {
    "grass": _grass,
    "sand": _sand,
    "water": _water,
    "brick": _brick,
    "snow": _snow,
    "wood": _wood,
    "asphalt": _asphalt,
    "tiles": _tiles,
}
# colour pairs too alike to tell apart in a colour change, a flash or a second object
SIMILAR = {
    frozenset(p)
    for p in (
        ("blue", "cyan"),
        ("red", "pink"),
        ("red", "orange"),
        ("orange", "yellow"),
        ("blue", "purple"),
        ("pink", "purple"),
    )
}
# object colours that would blend into a background
CLASHES = {
    "grass": {"green"},
    "sand": {"yellow", "orange"},
    "water": {"blue", "cyan"},
    "brick": {"red", "orange"},
    "snow": {"white"},
    "wood": {"orange"},
    "asphalt": {"black"},
    "tiles": {"white"},
}


@lru_cache(maxsize=8)
def render_background(name: str, seed: int, size: int) -> np.ndarray:
    """Static texture -> float32 [S, S, 3] in [0, 255], read-only; shared by a twin group's clips
    (cached: the 4 twins are rendered one after another)."""
    rng = np.random.default_rng(seed)
    img = np.clip(BACKGROUNDS[name](rng, size), 0, 255).astype(np.float32)
    img.flags.writeable = False
    return img


# ----------------------------------------------------------------------------- shapes
# Signed distance in units of the object radius (<= 0 inside), on offsets dx, dy of any shape.


def _polygon(dx, dy, n: int, apothem: float, phase: float):
    angles = phase + 2 * np.pi * np.arange(n) / n
    return np.max([dx * np.cos(a) + dy * np.sin(a) for a in angles], axis=0) - apothem


def _star(dx, dy):
    rho, theta = np.hypot(dx, dy), np.arctan2(dy, dx)
    t = ((theta + np.pi / 2) * 5 / (2 * np.pi)) % 1.0  # 0 at a tip (first tip points up)
    spikes = np.abs(t - 0.5) * 2  # 1 at tips, 0 between them
    return 0.6 * (rho - (0.5 + 0.65 * spikes))


def _cross(dx, dy):
    ax, ay = np.abs(dx), np.abs(dy)
    return np.minimum(np.maximum(ax - 1.0, ay - 0.36), np.maximum(ay - 1.0, ax - 0.36))


SHAPES = {
    "circle": lambda dx, dy: np.hypot(dx, dy) - 1.0,
    "square": lambda dx, dy: np.maximum(np.abs(dx), np.abs(dy)) - 0.84,
    "diamond": lambda dx, dy: (np.abs(dx) + np.abs(dy) - 1.15) / np.sqrt(2),
    "triangle": lambda dx, dy: _polygon(dx, dy + 0.12, 3, 0.6, np.pi / 2),  # tip up
    "hexagon": lambda dx, dy: _polygon(dx, dy, 6, 0.92, 0.0),
    "star": _star,
    "cross": _cross,
    "ring": lambda dx, dy: np.abs(np.hypot(dx, dy) - 0.75) - 0.25,
}


def composite(img, cx, cy, radius, alpha, fill, shape: str, size: int) -> np.ndarray:
    """Draw one object per frame onto img [T, S, S, 3] (in place, returned).

    cx, cy, radius (fractions), alpha [T] (0 hides the object), fill [T, 3] RGB. Antialiased by
    a one-pixel coverage ramp on the signed distance; a dark outline keeps edges visible. Only
    the object's bounding box is touched, which keeps a 128 px clip at a few milliseconds.
    """
    for t in np.flatnonzero(alpha > 0):
        _draw(
            img[t],
            float(cx[t]) * size,
            float(cy[t]) * size,
            float(radius[t]) * size,
            float(alpha[t]),
            np.asarray(fill[t], np.float32),
            shape,
            size,
        )
    return img


def _draw(frame, x: float, y: float, r: float, alpha: float, fill, shape: str, size: int) -> None:
    """One object on one frame [S, S, 3]; x, y, r in pixels."""
    reach = 1.3 * r + 2  # every shape lies within 1.3 radii of its centre
    x0, x1 = max(0, int(x - reach)), min(size, int(np.ceil(x + reach)))
    y0, y1 = max(0, int(y - reach)), min(size, int(np.ceil(y + reach)))
    if x0 >= x1 or y0 >= y1:
        return  # entirely outside the frame
    dx = ((np.arange(x0, x1, dtype=np.float32) + 0.5 - x) / r)[None, :]  # [1, w]
    dy = ((np.arange(y0, y1, dtype=np.float32) + 0.5 - y) / r)[:, None]  # [h, 1]
    sd = SHAPES[shape](dx, dy) * r  # [h, w] signed distance in pixels
    outer = np.clip(0.5 - sd, 0, 1)[..., None] * alpha
    inner = np.clip(0.5 - sd - max(1.0, r / 7), 0, 1)[..., None] * alpha
    crop = frame[y0:y1, x0:x1]
    crop *= 1 - outer
    crop += (outer - inner) * (OUTLINE * fill) + inner * fill


# ----------------------------------------------------------------------------- motion & events


def _ease(u):
    return np.clip(u, 0.0, 1.0)


def path_positions(path: dict, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre of the main object at times u -> (cx [T], cy [T])."""
    return PATHS[path["kind"]](path, u)


def _line(p, u):
    (x0, y0), (x1, y1) = p["start"], p["end"]
    return x0 + (x1 - x0) * u, y0 + (y1 - y0) * u


def _arc(p, u):
    a = p["start_angle"] + p["sweep"] * u  # positive sweep = clockwise on screen (y down)
    return p["centre"][0] + p["radius"] * np.cos(a), p["centre"][1] + p["radius"] * np.sin(a)


def _point(p, u):
    return np.full_like(u, p["at"][0]), np.full_like(u, p["at"][1])


PATHS = {"line": _line, "arc": _arc, "point": _point}


def _window(e: dict, u: np.ndarray) -> np.ndarray:
    """Phase of a brief event: sin(pi * phase) inside [start, end], 0 outside -> [T]."""
    ph = (u - e["start"]) / (e["end"] - e["start"])
    return np.where((ph >= 0) & (ph <= 1), np.sin(np.pi * np.clip(ph, 0, 1)), 0.0)


def _inside(e, u):
    return (u >= e["start"]) & (u <= e["end"])


def main_state(factors: dict, u: np.ndarray) -> dict[str, np.ndarray]:
    """Per-frame state of the main object: cx, cy, scale, alpha [T] and fill [T, 3]."""
    cx, cy = path_positions(factors["path"], u)
    st = {
        "cx": cx,
        "cy": cy,
        "scale": np.ones_like(u),
        "alpha": np.ones_like(u),
        "fill": np.tile(np.asarray(COLOURS[factors["colour"]], np.float32), (len(u), 1)),
    }
    for e in factors["events"]:
        EVENTS.get(e["type"], lambda st, e, u: None)(st, e, u)
    return st


def _colour_change(st, e, u):
    st["fill"][u >= e["at"]] = COLOURS[e["to"]]


def _grow(st, e, u, a=1.0, b=GROW):
    ramp = _ease((u - e["start"]) / (e["end"] - e["start"]))
    st["scale"] *= a + (b - a) * ramp


def _vanish(st, e, u):
    st["alpha"][u >= e["at"]] = 0.0


def _appear(st, e, u):
    st["alpha"][u < e["at"]] = 0.0


def _hop(st, e, u):
    st["cy"] = st["cy"] - HOP * _window(e, u)


def _blink(st, e, u):
    st["alpha"][_inside(e, u)] = 0.0


def _flash(st, e, u):
    st["fill"][_inside(e, u)] = COLOURS[e["colour"]]


def _pulse(st, e, u):
    st["scale"] *= 1 + (PULSE - 1) * _window(e, u)


EVENTS = {
    "colour_change": _colour_change,
    "grow": _grow,
    "shrink": lambda st, e, u: _grow(st, e, u, GROW, 1.0),
    "vanish": _vanish,
    "appear": _appear,
    "hop": _hop,
    "blink": _blink,
    "flash": _flash,
    "pulse": _pulse,
}  # "enter" / "leave" move the second object: see second_state


def second_state(e: dict, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre of the second object: slides between its rest point and just outside its side."""
    rest = np.asarray(e["rest"], np.float32)
    outside = rest.copy()
    outside[0] = -0.15 if e["side"] == "left" else 1.15
    ramp = _ease((u - e["start"]) / (e["end"] - e["start"]))
    if e["type"] == "leave":
        ramp = 1.0 - ramp  # 1 at rest, 0 outside
    pos = outside[None] + (rest - outside)[None] * ramp[:, None]
    return pos[:, 0], pos[:, 1]


def render_clip(factors: dict, frames: int, size: int) -> np.ndarray:
    """Factors -> uint8 frames [T, S, S, 3]."""
    u = np.linspace(0.0, 1.0, frames, dtype=np.float32)
    bg = render_background(factors["background"], factors["background_seed"], size)
    img = np.repeat(bg[None], frames, axis=0)  # [T, S, S, 3]
    for e in factors["events"]:
        if e["type"] in ("enter", "leave"):
            cx, cy = second_state(e, u)
            fill = np.tile(np.asarray(COLOURS[e["colour"]], np.float32), (frames, 1))
            radius = np.full(frames, SECOND_RADIUS, np.float32)
            composite(img, cx, cy, radius, np.ones(frames, np.float32), fill, e["shape"], size)
    st = main_state(factors, u)
    radius = SIZES[factors["size"]] * st["scale"]
    composite(img, st["cx"], st["cy"], radius, st["alpha"], st["fill"], factors["shape"], size)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- encoding

# Reproducible bytes: one thread, and no macroblock-tree rate control (x264's mbtree lookahead
# gave different bytes for the same frames from run to run on these small clips; measured).
X264_OPTIONS = {"preset": "veryfast", "crf": "18", "threads": "1", "x264-params": "mbtree=0"}


def encode_mp4(frames: np.ndarray, path: Path, fps: int, comment: str = "") -> None:
    """uint8 [T, S, S, 3] -> H.264 yuv420p mp4 at `path` (bit-exact muxing, no timestamps)."""
    with av.open(str(path), "w", format="mp4", options={"fflags": "+bitexact"}) as c:
        if comment:
            c.metadata["comment"] = comment
        stream = c.add_stream("libx264", rate=fps, options=dict(X264_OPTIONS))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1  # PyAV's default (0 = auto) overrides threads=1
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            vf.pts = i
            c.mux(stream.encode(vf))
        c.mux(stream.encode())


def mp4_comment_and_frames(path: Path) -> tuple[str, int, int]:
    """(comment tag, frame count, width) from the header, without decoding; raises on bad files."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return c.metadata.get("comment", ""), s.frames, s.codec_context.width
