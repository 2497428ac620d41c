"""Does the captioner's likelihood tell twins apart? The held-out counterpart of DG-DPO's video group.

For each clip v of a twin group G and each of v's specific sentences s, the captioner scores s under
every clip of G: log pi(s | u), u in G. The sentence is "grounded" when its own clip is the strict
argmax (ties count as misses, as everywhere in the evaluation). Chance is 1 / |G|. DG-DPO's video
group pushes exactly this on the training clips (log pi(c | v) > log pi(c | twin)); on test clips it
says whether the update generalises, independently of greedy decoding and of any retriever.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..records import Dataset


def own_margins(logps: Tensor, own: Tensor) -> Tensor:
    """[S]: each row's own column minus its best other column. logps [S, K], own [S] (column indices)."""
    others = logps.scatter(1, own[:, None], float("-inf"))
    return logps.gather(1, own[:, None])[:, 0] - others.max(1).values


def grounded_share(logps: Tensor, own: Tensor) -> float:
    """% of rows whose own column is the strict maximum (margin > 0: a tie is a miss)."""
    return float((own_margins(logps, own) > 0).float().mean() * 100)


@torch.no_grad()
def twin_logprobs(captioner, dataset: Dataset, visual: Callable[[Sequence[str]], Tensor], split: str = "test"):
    """Per twin group of the split: log pi(s | u) of every specific sentence s of its clips under
    every clip u. Returns (rows [S, K], own clip per row [S]) stacked over the groups of size K
    (groups of other sizes are left out; lone videos have no twins)."""
    groups = [u for u in dataset.units([v.id for v in dataset.split(split)]) if len(u) > 1]
    size = max((len(u) for u in groups), default=0)
    rows, own = [], []
    for unit in (u for u in groups if len(u) == size):
        sents = [(i, s) for i, v in enumerate(unit) for s in dataset.specific_sentences_of(v)]
        feats = visual(unit)
        lp = captioner.logprob(feats.repeat(len(sents), *[1] * (feats.dim() - 1)), [s for _, s in sents for _ in unit])
        rows.append(lp.reshape(len(sents), len(unit)).float().cpu())
        own += [i for i, _ in sents]
    if not rows:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(rows), torch.tensor(own)
