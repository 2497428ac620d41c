"""Captioner: log-probs, sampling, SFT, save/load, caption files — all on the tiny random Llama."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from caredpo.captioner.base import Captioner
from caredpo.captioner.factors import (
    direction_correct,
    factor_correct,
    factor_scores,
    first_mention,
    motion_correct,
    stated_directions,
    stated_events,
    stated_motion_kinds,
)
from caredpo.captioner.generate import SamplingConfig, generate_captions, load_captions
from caredpo.captioner.model import CaptionerConfig, VideoCaptioner
from caredpo.captioner.sampling import pick_tokens, stream_uniforms
from caredpo.captioner.sft import SFTConfig, batch_at, train_sft
from caredpo.io import read_jsonl
from caredpo.records import DataError, Dataset, Sentence, Video

TINY = CaptionerConfig(lm="tiny", projector_hidden=32, lora_layers=-1, lora_rank=4)
CAPS = [
    "a red circle moves from left to right",
    "a blue square",
    "x",
    "a small green star slides down over the sand and turns yellow halfway",
]
pytestmark = pytest.mark.usefixtures("one_thread")


def feats(b: int, seed: int = 0, t: int = 8) -> torch.Tensor:
    return torch.randn(b, t, 4, 1280, generator=torch.Generator().manual_seed(seed)).abs()


@pytest.fixture(scope="module")
def model() -> VideoCaptioner:
    m = VideoCaptioner(TINY)
    with torch.no_grad():  # LoRA B starts at zero: give it values so the adapter path is exercised
        for n, p in m.lm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return m.eval()


class FakeStore:
    """What `FeatureStore` offers the captioner: ids, membership, grid_feats."""

    def __init__(self, ids: list[str], seed: int = 0):
        self.ids = list(ids)
        self._f = dict(zip(ids, feats(len(ids), seed)))

    def __contains__(self, vid: str) -> bool:
        return vid in self._f

    def grid_feats(self, ids) -> torch.Tensor:
        return torch.stack([self._f[i] for i in ids])


def tiny_dataset(n_clips: int = 4) -> Dataset:
    words = ["red", "blue", "green", "yellow"]
    videos = [Video(f"v{i}", f"v{i}.mp4", "train", group=f"g{i}") for i in range(n_clips)]
    sentences = [
        Sentence(f"v{i}", f"a {words[i % 4]} circle moves {d}") for i in range(n_clips) for d in ("up", "down")
    ]
    return Dataset(root=".", videos=videos, sentences=sentences)


def reference_logprob(m: VideoCaptioner, f: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """One plain forward pass of prefix + caption through the LM, full logits, summed by hand."""
    out = []
    for i, c in enumerate(captions):
        ids = m.tokenizer(c, add_special_tokens=False).input_ids + [m.eos_id]
        pre = m.prefix_embeds(f[i : i + 1])
        emb = torch.cat([pre, m.embed(torch.tensor([ids]))], 1)
        logp = m.lm(inputs_embeds=emb).logits[0].log_softmax(-1)
        P = pre.shape[1]
        out.append(sum(logp[P - 1 + j, tok] for j, tok in enumerate(ids)))
    return torch.stack(out)


def test_is_a_captioner(model):
    assert isinstance(model, Captioner)


def test_logprob_equals_plain_forward_sum(model):
    f = feats(4)
    with torch.no_grad():
        got, ref = model.logprob(f, CAPS), reference_logprob(model, f, CAPS)
    assert got.shape == (4,)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-5)
    assert (got < 0).all()


def test_padding_and_batch_mates_do_not_change_logprob(model):
    f = feats(4)
    with torch.no_grad():
        alone = torch.cat([model.logprob(f[i : i + 1], [c]) for i, c in enumerate(CAPS)])
        batched = model.logprob(f, CAPS)  # "x" is padded to the longest caption
        repeated = model.logprob(torch.cat([f, f[:2]]), CAPS + CAPS[:2])  # shared prefixes
    torch.testing.assert_close(batched, alone, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(repeated[4:], alone[:2], atol=1e-4, rtol=1e-5)


def test_logprob_is_differentiable_wrt_trainable_parts(model):
    model.set_trainable(projector=True, lora=True)
    model.zero_grad()
    model.logprob(feats(2), CAPS[:2]).sum().backward()
    assert model.projector.fc1.weight.grad.abs().sum() > 0
    lora_grads = [p.grad for n, p in model.lm.named_parameters() if "lora_A" in n]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)
    assert all(p.grad is None for n, p in model.lm.named_parameters() if "lora_" not in n)
    model.zero_grad()


def test_generation_reproducible_under_seed(model):
    f = feats(3)
    a = model.generate(f, n=4, temperature=1.0, top_p=0.9, max_new_tokens=12, seed=7)
    b = model.generate(f, n=4, temperature=1.0, top_p=0.9, max_new_tokens=12, seed=7)
    c = model.generate(f, n=4, temperature=1.0, top_p=0.9, max_new_tokens=12, seed=8)
    assert a == b
    assert a != c
    assert len(a) == 3 and all(len(x) == 4 for x in a)


def test_stream_uniforms_are_one_generator_drawn_a_row_per_step():
    g = torch.Generator().manual_seed(5)
    loop = torch.stack([torch.rand(6, generator=g) for _ in range(4)], 1)  # a draw of 6 rows per step
    assert torch.equal(stream_uniforms(5, 6, 4), loop)


def test_stacked_uniforms_sample_what_separate_seeded_calls_do(model):
    """Two batches with one seed each, sampled in one call from their stacked tables: the same
    captions as two calls (the preference stage batches twin groups this way)."""
    f, kw = feats(4), dict(n=2, temperature=1.0, top_p=0.9, max_new_tokens=8)
    apart = model.generate(f[:2], seed=3, **kw) + model.generate(f[2:], seed=4, **kw)
    table = torch.cat([stream_uniforms(3, 4, 8), stream_uniforms(4, 4, 8)])
    assert model.generate(f, uniforms=table, **kw) == apart
    with pytest.raises(ValueError, match="uniforms must be"):
        model.generate(f, uniforms=table[:, :4], **kw)


def test_greedy_matches_hf_generate(model):
    """Our loop (shared prefix cache, finished rows dropped) = HF generate on the same embeddings."""
    f = feats(2, seed=3)
    ours = model.generate(f, n=1, temperature=0, max_new_tokens=10)
    with torch.no_grad():
        pre = model.prefix_embeds(f)
        out = model.base_lm.generate(
            inputs_embeds=pre,
            attention_mask=torch.ones(pre.shape[:2], dtype=torch.long),
            do_sample=False,
            max_new_tokens=10,
            eos_token_id=model.eos_id,
            pad_token_id=model.pad_id,
        )
    hf = [model.decode_ids(row) for row in out.tolist()]
    assert [x[0] for x in ours] == hf


def test_pick_tokens_inverse_cdf_and_nucleus():
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3]]))
    pick = lambda u, p: int(pick_tokens(logits, 1.0, p, torch.tensor([u])))  # noqa: E731
    assert [pick(u, 1.0) for u in (0.1, 0.3, 0.69, 0.71, 0.99)] == [0, 1, 1, 2, 2]
    assert {pick(u / 20, 0.6) for u in range(20)} == {1, 2}  # nucleus 0.6 keeps 0.5 and 0.3
    assert int(pick_tokens(logits, 0.0, 1.0, torch.tensor([0.0]))) == 1  # greedy


def test_feature_shape_checked_and_frames_subsampled(model):
    with pytest.raises(ValueError, match="features must be"):
        model.logprob(torch.zeros(1, 8, 4, 7), ["a"])
    with pytest.raises(ValueError, match="frames"):
        model.logprob(torch.zeros(1, 4, 4, 1280), ["a"])
    f16 = feats(1, t=16)
    with torch.no_grad():
        torch.testing.assert_close(model.logprob(f16, ["a"]), model.logprob(f16[:, [0, 2, 4, 6, 9, 11, 13, 15]], ["a"]))


def test_colour_channels_are_normalised_apart_from_the_cnn_ones():
    m = VideoCaptioner(replace(TINY, colour_bins=8))
    x, c = feats(2), torch.rand(2, 8, 4, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # each part's units drop out: CNN x100 and colour x0.1 give the same tokens
        torch.testing.assert_close(
            m.projector(torch.cat([x, c], -1)), m.projector(torch.cat([100 * x, 0.1 * c], -1)), rtol=1e-4, atol=1e-4
        )
    with pytest.raises(ValueError, match=r"1280 CNN \+ 8 colour channels"):
        m.logprob(x, ["a red circle", "a blue square"])


def test_clip_tokens_read_frame_order_and_frame_tokens_do_not():
    m = VideoCaptioner(replace(TINY, clip_tokens=2))
    x = feats(2)
    rev = x.flip(1)  # the same frames played backwards: left-to-right becomes right-to-left
    n = TINY.num_frames * TINY.grid_cells
    with torch.no_grad():
        fwd, bwd = m.projector(x) - m.projector.pos, m.projector(rev) - m.projector.pos
    assert fwd.shape == (2, n + 2, m.embed.embedding_dim) == (2, m.config.num_visual_tokens, m.embed.embedding_dim)
    g = TINY.grid_cells  # a frame token is its frame's alone: reversing time only reorders them
    torch.testing.assert_close(bwd[:, :n].reshape(2, -1, g, bwd.shape[-1]).flip(1).reshape(2, n, -1), fwd[:, :n])
    assert (bwd[:, n:] - fwd[:, n:]).abs().max() > 1e-3  # a clip token sees the order
    with torch.no_grad():
        assert torch.isfinite(m.logprob(x, CAPS[:2])).all()
    with pytest.raises(ValueError, match="clip_tokens"):
        CaptionerConfig(clip_tokens=-1)


def test_config_validation():
    with pytest.raises(ValueError, match="chat_format"):
        CaptionerConfig(chat_format="nope")
    with pytest.raises(ValueError, match="lora_layers"):
        CaptionerConfig(lora_layers=-3)
    with pytest.raises(ValueError, match="nothing to train"):
        SFTConfig(train_projector=False, train_lora=False)


def test_save_load_roundtrip(model, tmp_path):
    model.save_pretrained(tmp_path / "cap")
    again = VideoCaptioner.from_pretrained(tmp_path / "cap").eval()
    f = feats(2)
    with torch.no_grad():
        torch.testing.assert_close(again.logprob(f, CAPS[:2]), model.logprob(f, CAPS[:2]))
    assert (tmp_path / "cap" / "adapter" / "adapter_model.safetensors").exists()
    with pytest.raises(DataError):
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "config.json").write_text('{"format": "other"}')
        VideoCaptioner.from_pretrained(tmp_path / "bad")


def test_batch_plan_covers_all_sentences():
    ds = tiny_dataset(4)
    sents = {v.id: ds.sentences_of(v.id) for v in ds.videos}
    cfg = SFTConfig(videos_per_step=2, captions_per_video=1)
    seen = set()
    for step in range(4):  # 2 steps an epoch, 1 of 2 sentences a video per epoch
        vids, caps = batch_at(step, list(sents), sents, cfg)
        assert batch_at(step, list(sents), sents, cfg) == (vids, caps)
        seen.update(zip(vids, caps))
    assert seen == {(v, s) for v, ss in sents.items() for s in ss}


def test_sft_overfits_a_handful_of_clips(tmp_path):
    ds, store = tiny_dataset(4), FakeStore([f"v{i}" for i in range(4)])
    model = VideoCaptioner(TINY)
    base0 = {n: p.detach().clone() for n, p in model.lm.named_parameters() if "lora_" not in n}
    lora0 = {n: p.detach().clone() for n, p in model.lm.named_parameters() if "lora_" in n}
    proj0 = {n: p.detach().clone() for n, p in model.projector.named_parameters()}
    cfg = SFTConfig(
        steps=60,
        videos_per_step=4,
        captions_per_video=2,
        lr_projector=1e-2,
        lr_lora=1e-2,
        warmup_steps=2,
        val_fraction=0.0,
        save_every=0,
    )
    result = train_sft(model, ds, store, tmp_path / "run", cfg, show_progress=False, log=lambda s: None)
    losses = [r["loss"] for r in read_jsonl(tmp_path / "run" / "log.jsonl")]
    assert len(losses) == 60 and result["steps_done"] == 60
    assert losses[-1] < 0.1 * losses[0] and losses[-1] < 1.0
    assert all(torch.equal(p, base0[n]) for n, p in model.lm.named_parameters() if "lora_" not in n)
    assert all(not torch.equal(p, lora0[n]) for n, p in model.lm.named_parameters() if "lora_B" in n)
    assert all(not torch.equal(p, proj0[n]) for n, p in model.projector.named_parameters())
    loaded = VideoCaptioner.from_pretrained(tmp_path / "run")  # the run folder resolves to run/model
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.logprob(store.grid_feats(["v0"]), ["a red circle moves up"]),
            model.eval().logprob(store.grid_feats(["v0"]), ["a red circle moves up"]),
        )


def test_sft_resume_continues_exactly(tmp_path, monkeypatch):
    import caredpo.captioner.sft as sft

    ds, store = tiny_dataset(4), FakeStore([f"v{i}" for i in range(4)])
    cfg = SFTConfig(steps=8, videos_per_step=2, captions_per_video=2, save_every=3, val_fraction=0.0)
    full = VideoCaptioner(TINY)
    train_sft(full, ds, store, tmp_path / "a", cfg, show_progress=False, log=lambda s: None)

    real, calls = sft.train_step, []

    def crashing(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sft, "train_step", crashing)
    with pytest.raises(KeyboardInterrupt):
        train_sft(VideoCaptioner(TINY), ds, store, tmp_path / "b", cfg, show_progress=False, log=lambda s: None)
    monkeypatch.setattr(sft, "train_step", real)
    resumed = VideoCaptioner(TINY)
    train_sft(resumed, ds, store, tmp_path / "b", cfg, resume=True, show_progress=False, log=lambda s: None)
    steps = [r["step"] for r in read_jsonl(tmp_path / "b" / "log.jsonl")]
    assert steps == [
        1,
        2,
        3,
        4,
        5,
        6,
        7,
        8,
    ]  # step 4 was logged, dropped on resume (after the step-3 checkpoint), redone
    for (n, p), q in zip(full.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, msg=n)


def test_generate_file_resumes_without_duplicates(model, tmp_path, monkeypatch):
    ids = [f"v{i}" for i in range(5)]
    store = FakeStore(ids)
    s = SamplingConfig(n=2, temperature=1.0, max_new_tokens=6, seed=1, batch_videos=2)
    whole = load_captions(generate_captions(model, store, ids, tmp_path / "a.jsonl", s, show_progress=False))

    real, calls = model.generate, []

    def crashing(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(model, "generate", crashing)
    with pytest.raises(KeyboardInterrupt):
        generate_captions(model, store, ids, tmp_path / "b.jsonl", s, show_progress=False)
    monkeypatch.setattr(model, "generate", real)
    generate_captions(model, store, ids, tmp_path / "b.jsonl", s, show_progress=False)
    rows = list(read_jsonl(tmp_path / "b.jsonl"))
    assert [r["video_id"] for r in rows] == ids
    assert {r["video_id"]: r["captions"] for r in rows} == whole
    assert rows[0]["sampling"]["temperature"] == 1.0 and all(len(r["captions"]) == 2 for r in rows)
    with pytest.raises(DataError, match="other sampling settings"):
        generate_captions(model, store, ids, tmp_path / "b.jsonl", SamplingConfig(n=1), show_progress=False)


@pytest.mark.parametrize(
    "caption, motion, ok",
    [
        ("a red circle slides from left to right over the grass", "left-to-right", True),
        ("a red circle moves from right to left over the grass", "left-to-right", False),
        ("a blue star slides to the left and sees a ring leave to the right", "right-to-left", True),
        ("a blue star shares the scene with a ring that leaves to the right", "left-to-right", False),
        ("a square goes around counterclockwise", "anticlockwise", True),
        ("a square moves in a counterclockwise circle", "clockwise", False),
        ("a square circles clockwise", "clockwise", True),
        ("a ring rises and then turns green", "up", True),
        ("a ring moves diagonally up to the left", "up-left", True),
        ("a ring moves diagonally up to the left", "up", False),
        ("a ring moves diagonally across the sand", "down-right", False),
        ("a ring on sand", "down", False),
        ("a ring stays in one place while a star enters from the left", "still", True),
    ],
)
def test_direction_check(caption, motion, ok):
    assert direction_correct(caption, {"motion": motion}) is ok


def test_direction_check_without_motion_factor():
    assert direction_correct("anything", {}) is None
    assert stated_directions("It moves from right to left, then rises!") == {"right-to-left", "up"}


@pytest.mark.parametrize(
    "caption, motion, ok",
    [
        ("a red circle moves horizontally over the grass", "right-to-left", True),  # generic, right
        ("a red circle slides to the left", "left-to-right", True),  # wrong way, right kind
        ("a red circle moves across the grass", "up", False),  # "across" = horizontal
        ("a ring moves diagonally across the sand", "down-right", True),  # not also "moves across"
        ("a square moves in a clockwise circle", "anticlockwise", True),
        ("a square goes around in a loop", "clockwise", True),
        ("a square moves in a circle and then rises", "clockwise", False),  # two kinds stated
        ("a star stays still on the sand", "still", True),
        ("a star on the sand", "still", False),  # nothing stated
    ],
)
def test_motion_kind_check(caption, motion, ok):
    assert motion_correct(caption, {"motion": motion}) is ok


def test_motion_kinds_stated():
    assert stated_motion_kinds("it moves vertically, then circles clockwise") == {"vertical", "circle"}
    assert motion_correct("anything", {"motion": "zigzag"}) is None


def test_first_mention_skips_background_phrases_and_later_objects():
    from caredpo.data.grammar import COLOUR_WORDS, SHAPE_WORDS

    caption = "a turquoise plus sign on a green field briefly turns red and a ball enters"
    assert first_mention(caption, COLOUR_WORDS) == "cyan"  # "green field" is the background
    assert first_mention(caption, SHAPE_WORDS) == "cross"  # "ball" is a second object, later
    assert first_mention("a video of red bricks", COLOUR_WORDS) is None


def test_factor_scores_by_hand():
    clip = {"colour": "red", "shape": "circle", "size": "small", "background": "snow", "motion": "up"}
    rows = [
        ("a small red disc rises over a snowy field", clip),  # all five right
        ("a big blue circle moves down on the sand", clip),  # shape only
        ("a tiny red ring on white snow", clip),  # colour, size, background
        ("a red square", {"colour": "red", "shape": "square"}),
    ]  # no size/background/motion
    scores = factor_scores(rows)
    assert scores == {
        "n": 4,
        "colour": 75.0,
        "shape": 75.0,
        "size": 66.7,
        "background": 66.7,
        "motion": 66.7,
        "direction": 33.3,
    }  # "moves down": right kind (vertical), wrong way


BRIEF_CLIP = {
    "events": [
        {"type": "hop", "start": 0.15},
        {"type": "leave", "start": 0.2},
        {"type": "flash", "start": 0.6, "colour": "red"},
    ]
}


@pytest.mark.parametrize(
    "caption, clip, ok",
    [
        ("a ball hops and then briefly turns red", BRIEF_CLIP, False),  # the leave is missing
        (
            "a ball sees a blue box exit to the left in the first half and hops, and later flashes red",
            BRIEF_CLIP,
            True,
        ),  # lasting first, then in order
        (
            "a ball is left alone when a small blue plus sign leaves to the left and flashes red before it hops",
            BRIEF_CLIP,
            False,
        ),  # the brief pair reversed
        ("a disc turns blue halfway", {"events": [{"type": "colour_change", "at": 0.5, "to": "blue"}]}, True),
        ("a disc becomes turquoise in the middle", {"events": [{"type": "colour_change", "to": "cyan"}]}, True),
        ("a disc turns red halfway", {"events": [{"type": "colour_change", "to": "blue"}]}, False),  # twin's colour
        ("a disc shrinks halfway through", {"events": [{"type": "grow"}]}, False),
        ("a disc on snow", {"events": [{"type": "grow"}]}, False),
    ],
)
def test_events_check(caption, clip, ok):
    assert factor_correct(caption, clip, "events") is ok


def test_events_stated_in_order_and_every_reference_sentence_is_right():
    assert stated_events("it first flashes red, then pulses and shrinks halfway through") == [
        ("flash", None),
        ("pulse", None),
        ("shrink", None),
    ]  # "shrinks halfway through" read once
    assert factor_correct("anything", {}, "events") is None
    from caredpo.data.twinclips import TwinClipsConfig, plan_clips, plan_sentences

    config = TwinClipsConfig.preset("smoke")
    plans = plan_clips(config)
    factors = {p.video_id: p.factors for p in plans}
    for s in plan_sentences(config, plans):  # the grammar's specific sentences state them right
        if s["specificity"] == "specific":
            assert factor_correct(s["caption"], factors[s["video_id"]], "events"), s["caption"]


def test_grounded_share_against_a_loop_and_by_hand():
    from caredpo.captioner.grounding import grounded_share

    logps = torch.tensor([[-1.0, -2.0, -3.0], [-5.0, -1.0, -1.0], [-4.0, -3.0, -0.5], [-2.0, -2.0, -9.0]])
    own = torch.tensor([0, 1, 1, 1])
    naive = sum(all(row[o] > row[j] for j in range(3) if j != o) for row, o in zip(logps.tolist(), own.tolist()))
    # row 0 own best; row 1 tied with column 2 (a miss); row 2 column 2 beats it; row 3 tied: 1 of 4
    assert grounded_share(logps, own) == pytest.approx(100 * naive / 4) == pytest.approx(25.0)


def test_twin_logprobs_score_every_specific_sentence_under_every_twin():
    from caredpo.captioner.grounding import twin_logprobs

    videos = [Video(f"g{g}v{i}", f"g{g}v{i}.mp4", "test", group=f"g{g}") for g in range(2) for i in range(3)]
    videos.append(Video("lone", "lone.mp4", "test"))  # no twins: left out
    sentences = [Sentence(v.id, f"a red circle moves {d} {v.id}", "specific") for v in videos for d in ("up", "down")]
    sentences += [Sentence(v.id, "a video", "generic") for v in videos]  # not specific: left out
    ds = Dataset(root=".", videos=videos, sentences=sentences)
    store = FakeStore([v.id for v in videos])
    m = VideoCaptioner(TINY).eval()
    logps, own = twin_logprobs(m, ds, store.grid_feats)
    assert logps.shape == (12, 3) and own.tolist() == [0, 0, 1, 1, 2, 2] * 2
    with torch.no_grad():  # row 3: clip 1's second sentence under each clip of group 0, one call each
        want = torch.cat([m.logprob(store.grid_feats([f"g0v{u}"]), ["a red circle moves down g0v1"]) for u in range(3)])
    torch.testing.assert_close(logps[3], want.float(), atol=1e-4, rtol=1e-4)
