"""Per-cell colour histograms of frames: the colour the CNN features leave out.

EfficientNet-Lite0's last map carries little colour; these histograms carry it (the probes and the
captions with and without them: docs/results.md, "The captioner after SFT"). They cost one
bincount per frame batch.
"""

from __future__ import annotations

import torch


def cell_colour_histograms(frames: torch.Tensor, grid: int = 2, levels: int = 4) -> torch.Tensor:
    """uint8 [N, H, W, 3] frames -> float32 [N, grid*grid, levels**3].

    Each RGB channel is quantised to `levels` steps; per cell (row-major, like the CNN grid) the
    value of a bin is the square root of the fraction of the cell's pixels in it (the root keeps a
    small object's few pixels visible next to the background's many)."""
    if frames.dim() != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8 [N, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    N, H, W, _ = frames.shape
    q = frames.long() * levels // 256  # [N, H, W, 3] in 0..levels-1
    bins = (q[..., 0] * levels + q[..., 1]) * levels + q[..., 2]  # [N, H, W]
    cell_y = torch.arange(H) * grid // H  # [H] row of cells each pixel row falls in
    cell_x = torch.arange(W) * grid // W
    cell = cell_y[:, None] * grid + cell_x[None, :]  # [H, W]
    B, C = levels**3, grid * grid
    index = (torch.arange(N)[:, None, None] * C + cell) * B + bins  # [N, H, W] flat (frame, cell, bin)
    counts = torch.bincount(index.flatten(), minlength=N * C * B).view(N, C, B).float()
    return (counts / counts.sum(-1, keepdim=True)).sqrt()
