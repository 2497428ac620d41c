"""The reranker's listwise loss, a pure tensor function (checked against a loop in tests/test_rerank.py)."""

from __future__ import annotations

import torch
from torch import Tensor


def listwise_loss(scores: Tensor, positive: Tensor, mask: Tensor | None = None, temperature: float = 1.0) -> Tensor:
    """Mean over queries of -log softmax(scores / temperature)[positive] over the valid candidates.

    scores [Q, L]: one row per query, its candidate list (its video, its twins, hard negatives);
    positive [Q]: the column of the query's own video; mask [Q, L] bool: real candidates (rows of
    different lengths; the positive must be valid)."""
    if scores.ndim != 2 or positive.shape != scores.shape[:1]:
        raise ValueError(f"scores must be [Q, L] and positive [Q], got {tuple(scores.shape)}, {tuple(positive.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = scores.float() / temperature
    if mask is not None:
        if not mask.gather(1, positive[:, None]).all():
            raise ValueError("a query's positive candidate is masked out")
        logits = logits.masked_fill(~mask, float("-inf"))
    return torch.nn.functional.cross_entropy(logits, positive)
