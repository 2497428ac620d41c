"""Batch helpers shared by both captioner backends (our VideoCaptioner and the HF MLLMs):
caption ids, distinct clips, per-token log-probs."""

from __future__ import annotations

import torch


def caption_ids(tokenizer, captions: list[str], end_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption token ids + the end token, right-padded: ids [N, L] (long) and mask [N, L] (bool)."""
    rows = [tokenizer(c, add_special_tokens=False).input_ids + [end_id] for c in captions]
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), True
    return ids, mask


def distinct_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(distinct rows of x in first-seen order, index of each row's distinct row). Exact equality
    against the rows kept so far: a batch holds few clips, and frames are too big to sort."""
    keep, inv = [], []  # indices of the rows kept; each row's index into keep
    for i in range(x.shape[0]):
        j = next((k for k, r in enumerate(keep) if torch.equal(x[r], x[i])), None)
        if j is None:
            keep.append(i)
            j = len(keep) - 1
        inv.append(j)
    return x[keep], torch.tensor(inv, dtype=torch.long)


def caption_logprobs(lm_head, hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log p of each caption token from the hidden states that predict it: hidden [N, L, d], ids and
    mask [N, L] -> [N, L] (0 at pads). The LM head runs only at real caption positions."""
    logits = lm_head(hidden[mask]).float()  # [M, V]
    lp = logits.log_softmax(-1).gather(1, ids[mask][:, None])[:, 0]
    full = torch.zeros(ids.shape, dtype=lp.dtype, device=lp.device)
    full[mask] = lp
    return full
