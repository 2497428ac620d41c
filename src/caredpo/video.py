"""Video decoding with PyAV: uniform sampling of T frames and a square resize.

No torchvision: resizing is `F.interpolate(antialias=True)` on a centre crop (the frame
encoder's own pixel scaling lives in `caredpo.features.preprocess`). Every failure is a
`VideoError` whose message is one line naming the file and reason.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F

# Clips with at most this many frames per sampled frame are decoded straight through; longer
# ones seek to each sample (decoding a feature film to pick 16 frames would be wasteful).
SEQUENTIAL_FACTOR = 8


class VideoError(RuntimeError):
    """A video that cannot be read. str(e) is `<path>: <reason>`."""


def sample_indices(n_frames: int, num_frames: int) -> np.ndarray:
    """Centres of `num_frames` equal segments of [0, n_frames): the usual TSN/CLIP4Clip rule."""
    edges = np.linspace(0, n_frames, num_frames + 1)
    return np.minimum(((edges[:-1] + edges[1:]) / 2).astype(np.int64), n_frames - 1)


def read_frames(path: str | Path, num_frames: int, size: int) -> np.ndarray:
    """Decode `num_frames` uniformly sampled RGB frames -> uint8 [T, size, size, 3]."""
    path = Path(path)
    if not path.exists():
        raise VideoError(f"{path}: file not found")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: no video stream")
            frames = _decode(container, num_frames)
    except VideoError:
        raise
    except (av.error.FFmpegError, ValueError, OSError) as e:
        reason = getattr(e, "strerror", None) or str(e)  # ffmpeg's text, without the path again
        raise VideoError(f"{path}: not a readable video ({type(e).__name__}: {reason})") from None
    if not frames:
        raise VideoError(f"{path}: video has no decodable frames")
    return np.stack([square_resize(f, size) for f in frames])


def _decode(container: av.container.InputContainer, num_frames: int) -> list[np.ndarray]:
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    n = stream.frames  # from the header; 0 when the container does not say
    if n and n > num_frames * SEQUENTIAL_FACTOR and stream.duration and stream.time_base:
        return _decode_by_seeking(container, stream, n, num_frames)
    frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    if not frames:
        return []
    return [frames[i] for i in sample_indices(len(frames), num_frames)]


def _decode_by_seeking(container, stream, n: int, num_frames: int) -> list[np.ndarray]:
    """Seek to the keyframe before each target, decode forward to the first frame at/after it."""
    start = stream.start_time or 0
    step = stream.duration / n  # stream time-base units per frame
    out = []
    for idx in sample_indices(n, num_frames):
        target = start + int(idx * step)
        container.seek(target, stream=stream, backward=True, any_frame=False)
        frame = None
        for frame in container.decode(stream):
            if frame.pts is None or frame.pts + step / 2 >= target:
                break
        if frame is not None:
            out.append(frame.to_ndarray(format="rgb24"))
    return out


def square_resize(frame: np.ndarray, size: int) -> np.ndarray:
    """Centre crop to a square, then antialiased bilinear resize. [H, W, 3] -> [size, size, 3]."""
    h, w, _ = frame.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    crop = frame[top : top + s, left : left + s]
    if s == size:
        return np.ascontiguousarray(crop)
    x = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
