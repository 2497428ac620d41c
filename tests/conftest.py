"""Shared test helpers. `write_mp4` makes tiny real H.264 files with PyAV (no other tool)."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch


def write_mp4(path: str | Path, num_frames: int = 8, size: int = 32, seed: int = 0, fps: int = 8) -> Path:
    """A moving bright square on noise: `num_frames` frames of size x size, libx264, yuv420p."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 120, (size, size, 3), dtype=np.uint8)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "18"}
        for t in range(num_frames):
            img = background.copy()
            x = (t * (size - 8)) // max(num_frames - 1, 1)
            img[size // 2 - 4 : size // 2 + 4, x : x + 8] = (250, 40 + 20 * seed % 200, 40)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(stream.encode())
    return path


@pytest.fixture
def mp4_factory(tmp_path):
    """mp4_factory("a.mp4", num_frames=8, size=32, seed=0) -> Path under tmp_path."""

    def make(name: str, **kw) -> Path:
        return write_mp4(tmp_path / name, **kw)

    return make


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and the machine is shared: one torch thread for the
    module (use with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
