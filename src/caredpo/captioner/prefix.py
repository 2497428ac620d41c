"""The prefix-cache algorithm both captioner backends share (our VideoCaptioner, the HF MLLMs).

A caption is scored or sampled after a prefix (chat head, visual tokens, prompt) that is the same
for every caption of a clip, so the prefix runs once per distinct clip and its KV cache is reused
by all captions of that clip (n samples, or the K candidates of a DPO group). The LM head runs only
where a caption token is predicted. A backend subclasses `PrefixCaptioner` and supplies:

    visual_input(features) -> the checked visual input [B, ...] (frames subsampled, on the device)
    prefill(visual [U, ...]) -> (hidden state at the prefix's last position [U, d], KV cache)
    extend(ids [R, L], cache, offset) -> hidden states [R, L, d] of text tokens after the prefix;
        offset = tokens already appended after the prefix (positions P + offset ...)
    lm_head, tokenizer, device, end_id (closes a caption, fills stopped rows), pad_id, stop_ids
    autocast() (optional): the context every LM pass runs in
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from .batching import caption_ids, caption_logprobs, distinct_rows
from .sampling import pick_tokens, stream_uniforms, video_uniforms


def _check_sampling(n: int, temperature: float, top_p: float, max_new_tokens: int) -> None:
    if n < 1 or max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise ValueError("need n >= 1, max_new_tokens >= 1, temperature >= 0, 0 < top_p <= 1")


def _uniforms(seed: int | Sequence[int] | None, videos: int, n: int, steps: int) -> Tensor:
    """The sampling uniforms [videos * n, steps] of a generate call: one int (or None) seeds one
    stream for the batch (`stream_uniforms`), one seed per video gives each video its own rows
    (`video_uniforms`)."""
    if seed is None or isinstance(seed, int):
        return stream_uniforms(seed, videos * n, steps)
    if len(seed) != videos:
        raise ValueError(f"{len(seed)} seeds for {videos} videos")
    return video_uniforms(seed, n, steps)


def _select_rows(last: Tensor, cache, rows: Tensor) -> Tensor:
    """Prefill rows `rows` [R] (indices into its U clips) for R sequences: hidden [R, d], cache in
    place. Nothing is copied when the rows are already 0..U-1."""
    if len(rows) == len(last) and torch.equal(rows, torch.arange(len(rows))):
        return last
    rows = rows.to(last.device)
    cache.batch_select_indices(rows)
    return last[rows]


class PrefixCaptioner(nn.Module):
    """Implements `caredpo.captioner.base.Captioner` (generate / logprob) on a backend's
    prefill / extend (see the module docstring)."""

    seeds_per_video = True  # generate() takes one seed per video (see Captioner.generate)

    def autocast(self):
        return nullcontext()

    # ------------------------------------------------------------ log-probs

    def encode_captions(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """Caption token ids + the end token, right-padded: ids [N, L] and mask [N, L] (bool)."""
        ids, mask = caption_ids(self.tokenizer, captions, self.end_id, self.pad_id)
        return ids.to(self.device), mask.to(self.device)

    def token_logprobs(self, features: Tensor, captions: list[str]) -> tuple[Tensor, Tensor]:
        """log p of each caption token (end token included) given clip + prompt: ([N, L], mask [N, L]).

        Rows with identical visual input share one prefix pass. Right padding needs no attention
        mask: with causal attention a real token never sees the pads after it."""
        if features.shape[0] != len(captions):
            raise ValueError(f"{features.shape[0]} videos but {len(captions)} captions")
        ids, mask = self.encode_captions(captions)
        uniq, inv = distinct_rows(self.visual_input(features))
        with self.autocast():
            last, cache = self.prefill(uniq)
            hidden = _select_rows(last, cache, inv)[:, None]  # position P-1 predicts caption token 0
            if ids.shape[1] > 1:  # caption tokens 0..L-2 predict tokens 1..L-1
                hidden = torch.cat([hidden, self.extend(ids[:, :-1], cache, 0).to(hidden.dtype)], 1)
            return caption_logprobs(self.lm_head, hidden, ids, mask), mask

    def logprob(self, features: Tensor, captions: list[str]) -> Tensor:
        """Summed log p(caption + end token | clip, prompt) -> [B]. Differentiable."""
        return self.token_logprobs(features, captions)[0].sum(1)

    def nll(self, features: Tensor, captions: list[str]) -> Tensor:
        """Mean next-token loss over all caption tokens of the batch (the SFT loss)."""
        lp, mask = self.token_logprobs(features, captions)
        return -lp.sum() / mask.sum()

    # ------------------------------------------------------------ sampling

    @torch.inference_mode()
    def generate(
        self,
        features: Tensor,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 32,
        seed: int | Sequence[int] | None = None,
        uniforms: Tensor | None = None,
    ) -> list[list[str]]:
        """n captions per clip; temperature 0 = greedy. Same seed -> same captions; one seed per
        video: a video's captions do not depend on the other videos of the batch. uniforms: the
        table [B * n, max_new_tokens] itself instead of a seed (several batches' tables stacked)."""
        ids = self.generate_ids(features, n, temperature, top_p, max_new_tokens, seed, uniforms)
        texts = [self.decode_ids(row) for row in ids.tolist()]
        return [texts[i * n : (i + 1) * n] for i in range(features.shape[0])]

    @torch.inference_mode()
    def generate_ids(
        self,
        features: Tensor,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 32,
        seed: int | Sequence[int] | None = None,
        uniforms: Tensor | None = None,
    ) -> Tensor:
        """Token ids [B * n, max_new_tokens] (row b*n + j: sample j of clip b; end-filled after the end).
        One prefix pass per distinct clip, its KV cache repeated for the n samples."""
        _check_sampling(n, temperature, top_p, max_new_tokens)
        B = features.shape[0]
        if uniforms is None:
            uniforms = _uniforms(seed, B, n, max_new_tokens)
        elif uniforms.shape != (B * n, max_new_tokens):
            raise ValueError(f"uniforms must be [{B * n}, {max_new_tokens}], got {tuple(uniforms.shape)}")
        uniq, inv = distinct_rows(self.visual_input(features))
        with self.autocast():
            last, cache = self.prefill(uniq)
            h = _select_rows(last, cache, inv.repeat_interleave(n))
            return self.sample_loop(h, cache, temperature, top_p, max_new_tokens, uniforms.to(self.device))

    def sample_loop(
        self,
        h: Tensor,
        cache,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        uniforms: Tensor,
    ) -> Tensor:
        """From prefix hidden states h [R, d] and their cache -> token ids [R, max_new_tokens].
        Row r at step t picks with uniforms[r, t] ([R, >= max_new_tokens], on h's device). Rows
        that emit a stop id leave the batch and its cache."""
        R = h.shape[0]
        tokens = torch.full((R, max_new_tokens), self.end_id, dtype=torch.long, device=h.device)
        active, stop = torch.arange(R, device=h.device), torch.tensor(self.stop_ids, device=h.device)
        for step in range(max_new_tokens):
            nxt = pick_tokens(self.lm_head(h), temperature, top_p, uniforms[active, step])
            tokens[active, step] = nxt
            keep = ~torch.isin(nxt, stop)
            if step == max_new_tokens - 1 or not keep.any():
                break
            if not keep.all():
                active, nxt = active[keep], nxt[keep]
                cache.batch_select_indices(keep.nonzero()[:, 0])
            h = self.extend(nxt[:, None], cache, step)[:, -1]
        return tokens

    def decode_ids(self, row: list[int]) -> str:
        """Caption text of one row of token ids: up to the first stop id."""
        ends = [i for i, t in enumerate(row) if t in self.stop_ids]
        return self.tokenizer.decode(row[: ends[0]] if ends else row, skip_special_tokens=True).strip()
