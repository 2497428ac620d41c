"""Token sampling shared by our captioner and the HF backend: inverse-CDF picks from fixed uniforms.

A sample is a function of its uniforms only, so a seed (one per video: `video_uniforms`) fixes a
video's captions whatever else is in the batch, and greedy decoding is the same code at T = 0.
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


def sample_loop(model, h: torch.Tensor, cache, rows: int, temperature: float, top_p: float,
                max_new_tokens: int, gen: torch.Generator | None, table: torch.Tensor | None = None) -> torch.Tensor:
    """Decode from prefix hidden states h [R, d] and their cache -> token ids [R, max_new_tokens].
    model: anything with eos_id, lm_head, embed and decoder (our VideoCaptioner). Uniforms: row r at step t uses table[r, t] when given, else one draw of `gen` per row and step."""
    tokens = torch.full((rows, max_new_tokens), model.eos_id, dtype=torch.long, device=h.device)
    active = torch.arange(rows, device=h.device)
    for step in range(max_new_tokens):
        u = table[active, step] if table is not None else torch.rand(rows, generator=gen, device=h.device)[active]
        nxt = pick_tokens(model.lm_head(h), temperature, top_p, u)
        tokens[active, step] = nxt
        keep = nxt != model.eos_id
        if step == max_new_tokens - 1 or not keep.any():
            break
        if not keep.all():  # finished rows leave the batch and its cache
            active, nxt = active[keep], nxt[keep]
            cache.batch_select_indices(keep.nonzero()[:, 0])
        out = model.decoder(inputs_embeds=model.embed(nxt[:, None]), cache=cache, use_cache=True)
        h = out.last_hidden_state[:, -1]
    return tokens
