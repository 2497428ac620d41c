"""Per-cell colour histograms, checked on frames worked by hand."""

from __future__ import annotations

import pytest
import torch

from caredpo.colour import cell_colour_histograms

RED, BLUE, BLACK, WHITE = (255, 0, 0), (0, 0, 255), (0, 0, 0), (255, 255, 255)
# 4 levels a channel: bin = (r * 4 + g) * 4 + b with each channel quantised to 0..3
BIN = {RED: 48, BLUE: 3, BLACK: 0, WHITE: 63}


def frame(quadrants: list[tuple], side: int = 4) -> torch.Tensor:
    """One [side, side, 3] uint8 frame with the four quadrants (row-major) in the given colours."""
    f = torch.zeros(side, side, 3, dtype=torch.uint8)
    h = side // 2
    for k, rgb in enumerate(quadrants):
        y, x = divmod(k, 2)
        f[y * h : (y + 1) * h, x * h : (x + 1) * h] = torch.tensor(rgb, dtype=torch.uint8)
    return f


def test_one_colour_per_cell_fills_one_bin():
    hist = cell_colour_histograms(frame([RED, BLUE, BLACK, WHITE])[None])  # [1, 4, 64]
    assert hist.shape == (1, 4, 64)
    for cell, rgb in enumerate([RED, BLUE, BLACK, WHITE]):
        expected = torch.zeros(64)
        expected[BIN[rgb]] = 1.0
        torch.testing.assert_close(hist[0, cell], expected)


def test_mixed_cell_takes_square_roots_of_fractions():
    f = frame([BLACK] * 4)
    f[0, 0] = torch.tensor(RED, dtype=torch.uint8)  # 1 of the 4 pixels of the top-left cell
    hist = cell_colour_histograms(f[None])[0, 0]
    assert hist[BIN[RED]].item() == pytest.approx(0.5) and hist[BIN[BLACK]].item() == pytest.approx(0.75**0.5)
    assert (hist > 0).sum() == 2


def test_odd_sizes_split_every_pixel_into_one_cell():
    frames = torch.randint(0, 256, (3, 5, 7, 3), dtype=torch.uint8)
    hist = cell_colour_histograms(frames, grid=2, levels=2)  # [3, 4, 8]
    assert hist.shape == (3, 4, 8)
    torch.testing.assert_close(hist.pow(2).sum(-1), torch.ones(3, 4))  # fractions of each cell sum to 1


def test_rejects_float_frames():
    with pytest.raises(ValueError, match="uint8"):
        cell_colour_histograms(torch.zeros(1, 4, 4, 3))
