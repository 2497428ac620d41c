"""Projector alignment, the first phase of SFT: visual tokens learn to point at their captions' words.

LLaVA's stage 1 trains the projector alone on captions so that the LM can read the visual tokens
before it is tuned. Through the LM each such step costs a forward and backward of all 30 layers.
This phase uses a cheap stand-in with no LM pass at all: every visual token is scored against the
LM's own frozen input embeddings of the caption vocabulary (the ~200 token ids the training
sentences use), and a video's tokens together must predict the bag of words of its reference
sentences, IDF-weighted so that "a" and "the" count for little. The visual tokens end up near the
embeddings of "orange", "hoop", "diagonally": words the LM already reads. SFT then starts from a
projector that carries colour and kind of motion, which the LM-only gradient is slow to put there.

A step is a [B, N, d] x [d, V] product with V ~ 200: well under a second on 2 CPU cores.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from .. import dist
from ..records import NonFiniteLossError

# ------------------------------------------------------------------ pure tensor functions


def word_logits(visual: torch.Tensor, words: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Video-level word scores: [B, N, d] visual tokens x [V, d] word embeddings -> [B, V].

    Cosine similarity of each token to each word, times `scale`, pooled over the N tokens with a
    soft maximum (logsumexp - log N): a word is predicted when some token (some frame and cell)
    points at it, as the object's colour lives in the cells the object covers."""
    sim = F.normalize(visual, dim=-1) @ F.normalize(words, dim=-1).T * scale  # [B, N, V]
    return torch.logsumexp(sim, dim=1) - math.log(visual.shape[1])


def bag_of_words_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of [B, V] word logits against [B, V] target distributions (rows sum to 1)."""
    return -(targets * torch.log_softmax(logits, dim=-1)).sum(-1).mean()


# ------------------------------------------------------------------ targets


def caption_vocabulary(token_ids: Mapping[str, Sequence[Sequence[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids used by the captions of these videos ([V], sorted) and their IDF ([V]).

    token_ids: video id -> one token-id list per sentence. IDF = log(videos / videos using the token)."""
    df = Counter(t for sents in token_ids.values() for t in {t for s in sents for t in s})
    vocab = sorted(df)
    idf = torch.tensor([math.log(len(token_ids) / df[t]) for t in vocab])
    return torch.tensor(vocab, dtype=torch.long), idf


def bag_of_words_targets(
    sentences: Sequence[Sequence[Sequence[int]]], vocab: torch.Tensor, idf: torch.Tensor
) -> torch.Tensor:
    """[B, V] targets: per video, counts of vocab tokens over all its sentences x IDF, normalised.

    Tokens outside the vocabulary are ignored; a video whose tokens all have IDF 0 (a word every
    video uses) gets a uniform row rather than a division by zero."""
    index = {int(t): j for j, t in enumerate(vocab)}
    counts = torch.zeros(len(sentences), len(vocab))
    for b, sents in enumerate(sentences):
        for t, n in Counter(t for s in sents for t in s if t in index).items():
            counts[b, index[t]] = n
    weights = counts * idf
    total = weights.sum(-1, keepdim=True)
    return torch.where(total > 0, weights / total.clamp_min(1e-12), torch.full_like(weights, 1 / len(vocab)))


# ------------------------------------------------------------------ the phase


def align_projector(
    model,
    store,
    sentences: Mapping[str, Sequence[str]],
    train_ids: Sequence[str],
    steps: int,
    lr: float,
    batch_videos: int,
    seed: int = 0,
    show_progress: bool = True,
) -> dict:
    """Train `model.projector` alone (LM untouched) on the bag-of-words loss for `steps` steps.

    sentences: video id -> its reference sentences; batches of `batch_videos` train videos are drawn
    without replacement per epoch, from a generator seeded with `seed`. Under torchrun each process
    takes a contiguous share of every batch and weighs its loss by that share, so the summed
    gradients are the one-process gradient. Returns a summary (SFT's align.json)."""
    from rich.progress import TextColumn

    from ..progress import progress_bar

    tokens = {v: [model.tokenizer(s, add_special_tokens=False).input_ids for s in sentences[v]] for v in train_ids}
    vocab, idf = caption_vocabulary(tokens)
    targets = bag_of_words_targets([tokens[v] for v in train_ids], vocab, idf).to(model.device)
    words = model.embed.weight.detach()[vocab.to(model.device)].float()  # [V, d], frozen
    log_scale = torch.nn.Parameter(torch.tensor(math.log(20.0), device=model.device))  # CLIP-style temperature
    model.projector.requires_grad_(True)
    params = [*model.projector.parameters(), log_scale]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    batch = min(batch_videos, len(train_ids))
    if batch < dist.world_size():
        raise ValueError(f"projector alignment: {batch} videos a step for {dist.world_size()} processes")
    gen, order, losses = torch.Generator().manual_seed(seed), torch.empty(0, dtype=torch.long), []
    with progress_bar(TextColumn("loss {task.fields[loss]}"), show=show_progress) as bar:
        task = bar.add_task("projector alignment", total=steps, unit="steps", loss="--")
        for _ in range(steps):
            if len(order) < batch:  # the rest of this epoch, then the next one's shuffle
                order = torch.cat([order, torch.randperm(len(train_ids), generator=gen)])
            rows, order = order[:batch], order[batch:]
            mine = rows[dist.shard_slice(batch)]
            with model.autocast():
                visual = model.projector(model.visual_input(store.grid_feats([train_ids[i] for i in mine])))
                logits = word_logits(visual, words, log_scale.exp()).float()
            loss = bag_of_words_loss(logits, targets[mine.to(model.device)]) * (len(mine) / batch)  # this share
            whole = dist.all_reduce_sum(loss.detach().clone())
            if not torch.isfinite(whole):
                raise NonFiniteLossError(
                    f"projector alignment step {len(losses) + 1}: non-finite loss "
                    f"({float(whole)}); lower align_lr (now {lr})"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            dist.all_reduce_grads(params, average=False)
            opt.step()
            losses.append(float(whole))
            bar.update(task, advance=1, loss=f"{losses[-1]:.3f}")
    return {
        "steps": steps,
        "vocab_size": len(vocab),
        "first_loss": round(losses[0], 4) if losses else None,
        "last_loss": round(sum(losses[-10:]) / max(1, len(losses[-10:])), 4) if losses else None,
        "logit_scale": round(float(log_scale.detach().exp()), 2),
    }
