"""Projector alignment (the first phase of SFT): pure functions against hand-worked values and a
naive loop, then the phase itself on the tiny captioner."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from caredpo.captioner.align import (
    align_projector,
    bag_of_words_loss,
    bag_of_words_targets,
    caption_vocabulary,
    word_logits,
)
from caredpo.captioner.model import VideoCaptioner
from caredpo.captioner.sft import SFTConfig, train_sft
from caredpo.io import read_json
from test_captioner import TINY, FakeStore, tiny_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


def naive_word_logits(visual, words, scale):
    B, N, _ = visual.shape
    out = torch.zeros(B, words.shape[0])
    for b in range(B):
        for v in range(words.shape[0]):
            sims = [scale * F.cosine_similarity(visual[b, n], words[v], dim=0) for n in range(N)]
            out[b, v] = math.log(sum(math.exp(s) for s in sims) / N)
    return out


def test_word_logits_match_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    visual, words = torch.randn(2, 3, 5, generator=g), torch.randn(4, 5, generator=g)
    torch.testing.assert_close(word_logits(visual, words, 7.0), naive_word_logits(visual, words, 7.0))


def test_word_logits_one_token_is_scaled_cosine():
    visual, words = torch.tensor([[[1.0, 0.0]]]), torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 1.0]])
    torch.testing.assert_close(word_logits(visual, words, 10.0), torch.tensor([[10.0, 0.0, -10 / math.sqrt(2)]]))


def test_bag_of_words_loss_by_hand_and_against_cross_entropy():
    logits, targets = torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([[0.5, 0.5]])
    expected = -(0.5 * math.log(1 / 4) + 0.5 * math.log(3 / 4))
    assert bag_of_words_loss(logits, targets).item() == pytest.approx(expected)
    logits, labels = torch.randn(5, 7), torch.tensor([0, 3, 6, 2, 2])
    torch.testing.assert_close(bag_of_words_loss(logits, F.one_hot(labels, 7).float()), F.cross_entropy(logits, labels))


def test_vocabulary_idf_and_targets_by_hand():
    tokens = {"a": [[5, 7], [5]], "b": [[5, 9, 9]]}  # token 5 in both videos: IDF 0
    vocab, idf = caption_vocabulary(tokens)
    assert vocab.tolist() == [5, 7, 9]
    torch.testing.assert_close(idf, torch.tensor([0.0, math.log(2), math.log(2)]))
    targets = bag_of_words_targets([tokens["a"], tokens["b"], [[5, 42]]], vocab, idf)
    # a: 7 once -> all its weight; b: 9 twice -> all its weight; only-IDF-0 (42 is unknown) -> uniform
    torch.testing.assert_close(targets, torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1 / 3, 1 / 3, 1 / 3]]))


def test_alignment_lowers_its_loss_and_moves_only_the_projector():
    ds, store = tiny_dataset(4), FakeStore([f"v{i}" for i in range(4)])
    model = VideoCaptioner(TINY)
    lm0 = {n: p.detach().clone() for n, p in model.lm.named_parameters()}
    proj0 = {n: p.detach().clone() for n, p in model.projector.named_parameters()}
    sentences = {v.id: ds.sentences_of(v.id) for v in ds.videos}
    out = align_projector(
        model, store, sentences, list(sentences), steps=80, lr=3e-3, batch_videos=8, show_progress=False
    )
    assert out["steps"] == 80 and out["vocab_size"] > 4
    assert out["last_loss"] < out["first_loss"] - 0.2  # the colour word tells the four clips apart
    assert all(torch.equal(p, lm0[n]) for n, p in model.lm.named_parameters())
    assert all(not torch.equal(p, proj0[n]) for n, p in model.projector.named_parameters())


def test_sft_runs_alignment_first_and_records_it(tmp_path):
    ds, store = tiny_dataset(4), FakeStore([f"v{i}" for i in range(4)])
    cfg = SFTConfig(steps=2, videos_per_step=2, captions_per_video=1, align_steps=5, val_fraction=0.0)
    result = train_sft(VideoCaptioner(TINY), ds, store, tmp_path / "run", cfg, show_progress=False, log=lambda s: None)
    assert result["align"]["steps"] == 5 and read_json(tmp_path / "run" / "align.json") == result["align"]
    off = train_sft(
        VideoCaptioner(TINY),
        ds,
        store,
        tmp_path / "off",
        SFTConfig(**{**cfg.__dict__, "align_steps": 0}),
        show_progress=False,
        log=lambda s: None,
    )
    assert off["align"] is None and not (tmp_path / "off" / "align.json").exists()


def test_non_finite_losses_stop_alignment_and_sft_with_one_line(tmp_path):
    from caredpo.records import NonFiniteLossError

    ds, store = tiny_dataset(4), FakeStore([f"v{i}" for i in range(4)])
    model = VideoCaptioner(TINY)
    with torch.no_grad():
        model.projector.fc2.bias.fill_(float("nan"))
    sentences = {v.id: ds.sentences_of(v.id) for v in ds.videos}
    with pytest.raises(NonFiniteLossError, match="projector alignment step 1: non-finite loss"):
        align_projector(model, store, sentences, list(sentences), steps=3, lr=1e-3, batch_videos=4, show_progress=False)
    cfg = SFTConfig(steps=2, videos_per_step=2, captions_per_video=1, align_steps=0, val_fraction=0.0)
    with pytest.raises(NonFiniteLossError, match="captioner SFT step 1: non-finite loss"):
        train_sft(model, ds, store, tmp_path / "run", cfg, show_progress=False, log=lambda s: None)
