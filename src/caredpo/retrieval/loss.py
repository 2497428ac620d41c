"""Symmetric InfoNCE over a batch of (query, candidate) pairs.

Hard negatives come from the batch itself: the trainer fills batches with whole twin groups, so
every query meets the three look-alike clips of its own video among its negatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(
    queries: torch.Tensor, candidates: torch.Tensor, scale: torch.Tensor | float, positives: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of text->video and video->text cross-entropy.

    queries, candidates: [B, H] unit vectors, row i of each is a positive pair.
    scale: logit scale (1 / temperature).
    positives: optional [B, B] bool, True where query i and candidate j are both right answers
    (e.g. the same video twice in a batch); those pairs are removed from each other's negatives.
    """
    if queries.shape != candidates.shape:
        raise ValueError(f"queries {tuple(queries.shape)} and candidates {tuple(candidates.shape)} differ")
    logits = scale * queries @ candidates.T  # [B, B]
    if positives is not None:
        off_diag = positives & ~torch.eye(len(logits), dtype=torch.bool, device=logits.device)
        logits = logits.masked_fill(off_diag, float("-inf"))
    target = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
