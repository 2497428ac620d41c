"""Token sampling of both captioner backends (`prefix.PrefixCaptioner`): inverse-CDF picks from fixed uniforms.

A sample is a function of its uniforms only, so a seed (one per video: `video_uniforms`) fixes a
video's captions whatever else is in the batch, and greedy decoding is the same code at T = 0.
The uniforms are drawn on the CPU before decoding (a table [rows, steps]), so a seed gives the same
captions on any device up to the logits' arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pick_tokens(logits: torch.Tensor, temperature: float, top_p: float, u: torch.Tensor) -> torch.Tensor:
    """One token per row by inverse-CDF with uniforms u [R] (greedy when temperature == 0).

    Using one uniform per row per step (drawn for the full batch) keeps a row's sample fixed by
    the seed, whatever the other rows do."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = (logits.float() / temperature).softmax(-1)
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(-1, descending=True)
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)  # nucleus; top-1 always kept
    cdf = probs.cumsum(-1)
    idx = (cdf < u[:, None] * cdf[:, -1:]).sum(-1).clamp_max(probs.shape[-1] - 1)
    return idx if order is None else order.gather(1, idx[:, None])[:, 0]


def video_uniforms(seeds: Sequence[int], n: int, steps: int) -> torch.Tensor:
    """[len(seeds) * n, steps] sampling uniforms, video i's n rows drawn from its own seed only."""
    return torch.cat([torch.rand(n, steps, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def stream_uniforms(seed: int | None, rows: int, steps: int) -> torch.Tensor:
    """[rows, steps]: what one generator seeded `seed` (None: torch's global one) gives when drawn
    `rows` numbers per step, column t the t-th draw. One seed for a whole batch, so a row's sample
    depends on its place in the batch (the preference stage seeds a twin group this way)."""
    gen = None if seed is None else torch.Generator().manual_seed(int(seed))
    return torch.rand(steps, rows, generator=gen).T
