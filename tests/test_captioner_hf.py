"""HF video-MLLM captioner on tiny random Qwen2-VL, Qwen2.5-VL and LLaVA-OneVision models.

Each family is built from a tiny config in code (no downloads), saved with a tiny offline
tokenizer to a folder, and loaded back through `HFVideoCaptioner.from_pretrained(path)`.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from caredpo.captioner.base import Captioner
from caredpo.captioner.batching import distinct_rows
from caredpo.captioner.hf import HFCaptionerConfig, HFVideoCaptioner, VideoFrames
from caredpo.captioner.hf_families import family, qwen_patchify
from caredpo.captioner.sampling import stream_uniforms

T, S = 4, 16  # frames per clip, frame side of the tiny Qwen models (patch 4, merge 2)
SPECIALS = ["<|vision_start|>", "<|vision_end|>", "<|video_pad|>", "<|image_pad|>", "<video>", "<image>"]
CAPS = ["a red circle moves from left to right", "a blue square", "x"]
FAMILY_NAMES = ["qwen2_vl", "qwen2_5_vl", "llava_onevision"]
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
]  # peft vs transformers 5


def tiny_tokenizer():
    from caredpo.captioner.lm import build_tiny_tokenizer

    tok = build_tiny_tokenizer(vocab_size=400)
    tok.add_tokens(SPECIALS, special_tokens=True)
    return tok


def _text(tok, **extra) -> dict:
    return dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **extra,
    )


def tiny_model(kind: str, tok):
    """A random tiny model of the family; token ids taken from the tokenizer."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}
    mrope = {"rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}}  # head_dim 16: 8 frequencies
    qwen_ids = dict(
        video_token_id=ids["<|video_pad|>"],
        image_token_id=ids["<|image_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    if kind == "qwen2_vl":
        vision = dict(
            depth=1,
            embed_dim=16,
            hidden_size=32,
            num_heads=2,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
        )
        model = Qwen2VLForConditionalGeneration(
            Qwen2VLConfig(text_config=_text(tok, **mrope), vision_config=vision, **qwen_ids)
        )
    elif kind == "qwen2_5_vl":
        vision = dict(
            depth=2,
            hidden_size=16,
            intermediate_size=32,
            out_hidden_size=32,
            num_heads=2,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=8,
            fullatt_block_indexes=[1],
        )
        model = Qwen2_5_VLForConditionalGeneration(
            Qwen2_5_VLConfig(text_config=_text(tok, **mrope), vision_config=vision, **qwen_ids)
        )
    else:
        vision = dict(
            model_type="siglip_vision_model",
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
        cfg = LlavaOnevisionConfig(
            text_config=_text(tok, model_type="qwen2"),
            vision_config=vision,
            video_token_index=ids["<video>"],
            image_token_index=ids["<image>"],
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
        )
        model = LlavaOnevisionForConditionalGeneration(cfg)
    with torch.no_grad():  # HF's std 0.02 makes a near-uniform LM: give the head some opinions
        model.get_output_embeddings().weight.normal_(0.0, 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """family -> local folder with config.json, weights and tokenizer."""
    tok = tiny_tokenizer()
    out = {}
    for kind in FAMILY_NAMES:
        path = tmp_path_factory.mktemp(kind)
        tiny_model(kind, tok).save_pretrained(path)
        tok.save_pretrained(path)
        out[kind] = path
    return out


@pytest.fixture(scope="module")
def captioners(folders):
    out = {}
    for kind, path in folders.items():
        # fps 1: Qwen2.5-VL's temporal positions then differ from its default spacing
        m = HFVideoCaptioner.from_pretrained(path, device="cpu", num_frames=T, lora_rank=4, fps=1.0)
        with torch.no_grad():  # LoRA B starts at zero: give it values so the adapter path is exercised
            for n, p in m.lm.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
        out[kind] = m.eval()
    return out


def clips(m: HFVideoCaptioner, b: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, T, 3, m.frame_size, m.frame_size), generator=g, dtype=torch.uint8)


def plain_logits(m: HFVideoCaptioner, frames: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Logits [L, V] of one plain forward of the whole HF model over ids [1, L] holding the video
    placeholders: the model fills them from `frames` [T, 3, S, S] and lays out its own positions."""
    from caredpo.captioner import hf_families as fam

    vid = getattr(m.hf_config, m.spec.video_token_attr)
    kw = m.spec.vision_inputs(m.hf_config, fam.normalise(frames[None], m.frame_size, m.mean, m.std))
    if m.hf_config.model_type != "llava_onevision":
        kw["mm_token_type_ids"] = (ids == vid).int() * 2
    if m.hf_config.model_type == "qwen2_5_vl":
        kw["second_per_grid_ts"] = torch.tensor([2 / m.config.fps])
    m.inner.rope_deltas = None  # the Qwen models keep this between calls
    return m.lm(input_ids=ids, **kw).logits[0]


def plain_logprobs(m: HFVideoCaptioner, frames: torch.Tensor, tokens: list[int]) -> tuple[torch.Tensor, int]:
    """One plain forward over prompt + tokens: (log-probs [P + len(tokens), V], P)."""
    vid = getattr(m.hf_config, m.spec.video_token_attr)
    prompt = torch.cat([m.head_ids, torch.full((m.num_video_tokens,), vid), m.tail_ids])
    ids = torch.cat([prompt, torch.tensor(tokens, dtype=torch.long)])[None]
    return plain_logits(m, frames, ids).float().log_softmax(-1), prompt.shape[0]


def plain_logprob(m: HFVideoCaptioner, frames: torch.Tensor, caption: str) -> torch.Tensor:
    """Summed log-prob of caption + end token by hand from the plain forward."""
    cap = m.tokenizer(caption, add_special_tokens=False).input_ids + [m.end_id]
    logp, P = plain_logprobs(m, frames, cap)
    return sum(logp[P - 1 + j, t] for j, t in enumerate(cap))


@pytest.mark.parametrize("kind", FAMILY_NAMES)
def test_logprob_equals_plain_forward(captioners, kind):
    m = captioners[kind]
    assert isinstance(m, Captioner) and m.hf_config.model_type == kind
    f = clips(m, 3)
    with torch.no_grad():
        got = m.logprob(f, CAPS)
        want = torch.stack([plain_logprob(m, f[i], c) for i, c in enumerate(CAPS)])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", FAMILY_NAMES)
def test_padding_and_shared_prefix_do_not_change_logprob(captioners, kind):
    m = captioners[kind]
    f = clips(m, 2, seed=1)
    with torch.no_grad():
        alone = m.logprob(f[:1], [CAPS[1]])
        padded = m.logprob(f[[0, 0, 1]], [CAPS[1], CAPS[0], CAPS[2]])  # a longer caption pads it
    torch.testing.assert_close(padded[0], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", FAMILY_NAMES)
def test_generate_is_reproducible_under_a_seed(captioners, kind):
    m = captioners[kind]
    f = clips(m, 2, seed=2)
    a = m.generate(f, n=3, temperature=1.0, max_new_tokens=6, seed=5)
    b = m.generate(f, n=3, temperature=1.0, max_new_tokens=6, seed=5)
    assert a == b and len(a) == 2 and all(len(x) == 3 for x in a)
    others = [m.generate(f, n=3, temperature=1.0, max_new_tokens=6, seed=s) for s in (6, 7)]
    assert any(o != a for o in others)
    greedy = m.generate(f, n=2, temperature=0.0, max_new_tokens=6)
    assert all(g[0] == g[1] for g in greedy)


@pytest.mark.parametrize("kind", ["qwen2_vl", "llava_onevision"])
def test_per_video_seeds_make_captions_batch_independent(captioners, kind):
    """One seed per video: a video's captions are the same alone or batched with other videos
    (in any order, a clip repeated under another seed included), and `generate._sample` makes one
    batched call."""
    from types import SimpleNamespace

    from caredpo.captioner.generate import SamplingConfig, _sample

    m = captioners[kind]
    f = clips(m, 3, seed=7)
    kw = dict(n=3, temperature=1.5, max_new_tokens=8)
    alone = [m.generate(f[i : i + 1], seed=[100 + i], **kw)[0] for i in range(3)]
    assert len({c for caps in alone for c in caps}) > 3  # the samples do differ
    assert m.seeds_per_video and m.generate(f, seed=[100, 101, 102], **kw) == alone
    assert m.generate(f[[2, 0, 0]], seed=[102, 100, 7], **kw)[:2] == [alone[2], alone[0]]
    assert m.generate(f[[0, 1]], seed=[101, 100], **kw) != alone[:2]  # the seed, not the slot, decides
    calls = []  # a spy that counts generate calls
    spy = SimpleNamespace(seeds_per_video=True, generate=lambda x, **k: calls.append(x) or m.generate(x, **k))
    assert _sample(spy, f, [100, 101, 102], SamplingConfig(**kw)) == alone and len(calls) == 1


@pytest.mark.parametrize("kind", FAMILY_NAMES)
def test_greedy_tokens_are_the_plain_forward_argmax(captioners, kind):
    """Sampling's cached positions agree with the model's own: each greedy token is the argmax
    of a plain forward over prompt + the tokens before it."""
    m = captioners[kind]
    f = clips(m, 1, seed=3)
    with torch.no_grad():
        h, cache = m.prefill(f)
        toks = m.sample_loop(h, cache, 0.0, 1.0, 5, torch.zeros(1, 5))[0].tolist()
        logp, P = plain_logprobs(m, f[0], toks[:-1])
    assert logp[P - 1 :].argmax(-1).tolist()[: len(toks)] == toks[: len(logp) - P + 1]


def test_finished_rows_leave_the_batch(captioners):
    """A row that stops leaves the batch; the other rows sample exactly what they would have."""
    m = captioners["qwen2_vl"]
    f = clips(m, 2, seed=6)
    with torch.no_grad():
        full = m.sample_loop(*m.prefill(f), 1.0, 1.0, 6, stream_uniforms(1, 2, 6))
        stop, saved = full[0, 1].item(), m.stop_ids
        m.stop_ids = saved + [stop]  # row 0 now ends at step 1
        try:
            cut = m.sample_loop(*m.prefill(f), 1.0, 1.0, 6, stream_uniforms(1, 2, 6))
        finally:
            m.stop_ids = saved
    for r in range(2):
        row = full[r].tolist()
        n = row.index(stop) + 1 if stop in row else len(row)
        assert cut[r, :n].tolist() == row[:n]
    assert (cut[0, 2:] == m.end_id).all()


def test_qwen_patch_layout():
    """Row r of the patches is the (C, tp, p, p) block of merge window (t, bh, bw), cell (mh, mw)."""
    x = torch.randn(1, 3, 3, 16, 24)  # 3 frames: padded to 4 by repeating the last one
    patches, (t, h, w) = qwen_patchify(x, 4, 2, 2)
    assert (t, h, w) == (2, 4, 6) and patches.shape == (t * h * w, 3 * 2 * 4 * 4)
    xp = torch.cat([x, x[:, -1:]], 1)
    for ti, bh, bw, mh, mw in [(0, 0, 0, 0, 0), (1, 1, 2, 1, 0), (0, 1, 1, 0, 1)]:
        r = ((ti * (h // 2) + bh) * (w // 2) + bw) * 4 + mh * 2 + mw
        y, xx = (bh * 2 + mh) * 4, (bw * 2 + mw) * 4
        block = xp[0, ti * 2 : ti * 2 + 2, :, y : y + 4, xx : xx + 4].permute(1, 0, 2, 3)  # C, tp, p, p
        torch.testing.assert_close(patches[r], block.reshape(-1))


def test_save_and_load_round_trip(captioners, tmp_path):
    m = captioners["qwen2_5_vl"]
    m.save_pretrained(tmp_path / "run" / "model")
    meta = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert meta["captioner"]["num_frames"] == T
    back = HFVideoCaptioner.from_pretrained(tmp_path / "run", device="cpu").eval()  # a run folder works
    f = clips(m, 2, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(back.logprob(f, CAPS[:2]), m.logprob(f, CAPS[:2]))


def test_lora_only_on_the_language_model(captioners):
    m = captioners["llava_onevision"]
    lora = [n for n, _ in m.lm.named_parameters() if "lora_" in n]
    assert lora and all("language_model" in n and "self_attn" in n for n in lora)
    m.set_trainable()
    assert {n for n, p in m.lm.named_parameters() if p.requires_grad} == set(lora)


def test_errors_name_the_problem(folders, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match=r"model_type 'llama'.*supported: llava_onevision, qwen2_5_vl, qwen2_vl"):
        family(tmp_path)
    with pytest.raises(ValueError, match="multiple of"):
        HFVideoCaptioner.from_pretrained(folders["qwen2_vl"], device="cpu", frame_size=20)
    with pytest.raises(ValueError, match="HFCaptionerConfig.num_frames"):
        HFCaptionerConfig(model_path="x", num_frames=0)


def test_distinct_rows_and_video_frames(mp4_factory):
    from caredpo.records import Dataset, Sentence, Video

    x = torch.tensor([[1, 2], [3, 4], [1, 2], [3, 4], [5, 6]])
    uniq, inv = distinct_rows(x)
    assert uniq.tolist() == [[1, 2], [3, 4], [5, 6]] and inv.tolist() == [0, 1, 0, 1, 2]
    paths = [mp4_factory(f"v{i}.mp4", num_frames=8, size=32, seed=i) for i in range(2)]
    ds = Dataset(
        root=str(paths[0].parent),
        videos=[Video(f"v{i}", p.name, "train") for i, p in enumerate(paths)],
        sentences=[Sentence("v0", "a"), Sentence("v1", "b")],
    )
    frames = VideoFrames(ds, num_frames=4, size=16, max_cached=1)
    out = frames(["v1", "v0", "v1"])
    assert out.shape == (3, 4, 3, 16, 16) and out.dtype == torch.uint8
    assert torch.equal(out[0], out[2]) and list(frames._cache) == ["v1"]


def test_dg_dpo_moves_lora_not_base(folders, tmp_path):
    """A few DG-DPO steps through the real trainer on a tiny Qwen2-VL with fake preference rows."""
    from caredpo.dpo.config import DPOConfig
    from caredpo.dpo.train import metrics_rows, train_dpo

    policy = HFVideoCaptioner.from_pretrained(folders["qwen2_vl"], device="cpu", num_frames=T, lora_rank=4).eval()
    policy.set_trainable()
    ids = [f"v{g}{i}" for g in range(2) for i in range(2)]
    frames = dict(zip(ids, clips(policy, len(ids), seed=9)))
    feats = lambda vids: torch.stack([frames[v] for v in vids])  # noqa: E731
    rows = []
    with torch.no_grad():
        for v in ids:
            twins = [u for u in ids if u[1] == v[1] and u != v]
            ref = policy.logprob(feats([v] * 3), CAPS)
            cross = policy.logprob(feats(twins), [CAPS[0]] * len(twins))
            rows.append(
                {
                    "video_id": v,
                    "group": f"g{v[1]}",
                    "captions": CAPS,
                    "rewards": [1.0, 0.5, 0.0],
                    "ref_logps": ref.tolist(),
                    "best": 0,
                    "negatives": twins,
                    "ref_cross_logps": cross.tolist(),
                }
            )
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    cfg = DPOConfig(lr=1e-2, epochs=2, save_every=10)
    summary = train_dpo(policy, rows, feats, tmp_path / "dpo", cfg, show_progress=False)
    assert summary["finished"] and summary["steps"] == 4
    first = metrics_rows(tmp_path / "dpo")[0]
    assert first["loss_caption"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 0
    after = dict(policy.named_parameters())
    moved = {n for n, p in before.items() if not torch.equal(p, after[n])}
    assert moved and all("lora_" in n for n in moved)
    assert any("lora_A" in n for n in moved) and any("lora_B" in n for n in moved)


def _data_folder(root, mp4_factory, n: int = 4):
    """A TwinClips-shaped data folder: n training clips in two twin groups, real mp4 files."""
    videos = []
    for i in range(n):
        mp4_factory(f"videos/v{i}.mp4", num_frames=8, size=32, seed=i)
        videos.append({"video_id": f"v{i}", "video": f"videos/v{i}.mp4", "split": "train", "group": f"g{i // 2}"})
    sentences = [{"video_id": f"v{i}", "caption": "a red circle moves"} for i in range(n)]
    (root / "annotations.json").write_text(json.dumps({"videos": videos, "sentences": sentences}))
    return root


def test_cli_dpo_then_generate_with_hf(folders, tmp_path, mp4_factory):
    """`caredpo dpo --captioner hf` trains LoRA on decoded videos and saves OUT/model; `caredpo
    captioner generate --captioner hf --model-path OUT/model` reloads base + adapter from it."""
    from caredpo.cli import main
    from caredpo.data import load_dataset
    from caredpo.io import read_jsonl

    data = _data_folder(tmp_path, mp4_factory)
    ref = HFVideoCaptioner.from_pretrained(folders["qwen2_vl"], device="cpu").eval()  # CLI defaults
    frames = ref.frames(load_dataset(data))
    rows = []
    with torch.no_grad():
        for i in range(4):
            v, twin = f"v{i}", f"v{i ^ 1}"
            rows.append(
                {
                    "video_id": v,
                    "group": f"g{i // 2}",
                    "captions": CAPS[:2],
                    "rewards": [1.0, 0.0],
                    "ref_logps": ref.logprob(frames([v, v]), CAPS[:2]).tolist(),
                    "best": 0,
                    "negatives": [twin],
                    "ref_cross_logps": ref.logprob(frames([twin]), CAPS[:1]).tolist(),
                }
            )
    (tmp_path / "groups.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert (
        main(
            [
                "dpo",
                "--groups",
                str(tmp_path / "groups.jsonl"),
                "--captioner",
                "hf",
                "--model-path",
                str(folders["qwen2_vl"]),
                "--data",
                str(data),
                "--out",
                str(tmp_path / "dpo"),
                "--lr",
                "1e-2",
                "--lambda-nll",  # these hand-made rows carry no caption lengths
                "0",
                "--max-steps",
                "2",
            ]
        )
        == 0
    )
    first = json.loads((tmp_path / "dpo" / "log.jsonl").read_text().splitlines()[0])
    assert first["loss_caption"] == pytest.approx(math.log(2), abs=1e-4)
    out = tmp_path / "caps.jsonl"
    assert (
        main(
            [
                "captioner",
                "generate",
                "--captioner",
                "hf",
                "--model-path",
                str(tmp_path / "dpo" / "model"),
                "--data",
                str(data),
                "--split",
                "all",
                "--out",
                str(out),
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    assert [r["video_id"] for r in read_jsonl(out)] == ["v0", "v1", "v2", "v3"]
    assert main(["captioner", "generate", "--captioner", "hf", "--data", str(data), "--out", str(out)]) != 0
    assert (
        main(
            [
                "captioner",
                "generate",
                "--captioner",
                "hf",
                "--model-path",
                str(tmp_path),
                "--data",
                str(data),
                "--split",
                "train",
                "--out",
                str(out),
            ]
        )
        == 2
    )  # a folder with no model: one-line error


def test_preference_stage_takes_the_hf_visual_input(captioners, tmp_path, mp4_factory):
    """build_preferences(visual=captioner.frames(dataset)): samples and reference log-probs come
    from decoded frames; the retriever side still reads the feature store."""
    from types import SimpleNamespace

    from caredpo.data import load_dataset
    from caredpo.dpo.prefs import PrefsConfig, RetrieverReward, build_preferences
    from caredpo.dpo.train import load_groups

    class Scorer:  # S(q, c) = shared words; the video part is ignored
        model = SimpleNamespace(logit_scale=lambda: torch.tensor(2.0))

        def similarity(self, queries, feats, captions):
            return torch.tensor([[float(len(set(q.split()) & set(c.split()))) for c in captions] for q in queries])

    class Store:  # only the retriever's global features are read from it
        def global_feats(self, ids):
            return torch.zeros(len(ids), 2, 3)

        def grid_feats(self, ids):
            raise AssertionError("the HF captioner must get frames, not grid features")

    m = captioners["qwen2_vl"]
    ds = load_dataset(_data_folder(tmp_path, mp4_factory))
    frames = VideoFrames(ds, T, m.frame_size)
    path = build_preferences(
        m,
        RetrieverReward(Scorer(), Store()),
        ds,
        Store(),
        tmp_path / "prefs",
        {v.id: "a red circle" for v in ds.videos},
        PrefsConfig(num_samples=2, max_new_tokens=4),
        show_progress=False,
        visual=frames,
    )
    rows = load_groups(path)
    assert [r["video_id"] for r in rows] == ["v0", "v1", "v2", "v3"]
    with torch.no_grad():
        want = m.logprob(frames(["v2", "v2"]), rows[2]["captions"])
    assert rows[2]["ref_logps"] == pytest.approx(want.tolist(), abs=1e-5)
