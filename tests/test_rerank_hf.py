"""The reranker on a Hugging Face video MLLM backbone: tiny random Qwen2-VL, Qwen2.5-VL and
LLaVA-OneVision models built from configs in code (no downloads; see test_captioner_hf.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from caredpo.captioner.hf import HFVideoCaptioner
from caredpo.records import Dataset, Sentence, Video
from caredpo.rerank.model import Reranker, RerankerConfig
from caredpo.rerank.train import RerankerTrainConfig, train_reranker
from caredpo.training import MetricsLog
from test_captioner_hf import FAMILY_NAMES, T, plain_logits, tiny_model, tiny_tokenizer

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
]
CAPS = ["a red circle moves from left to right", "a blue square"]
QUERIES = ["red circle", "the square slides down over the sand", "blue"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tok = tiny_tokenizer()
    out = {}
    for kind in FAMILY_NAMES:
        out[kind] = tmp_path_factory.mktemp(f"rr_{kind}")
        tiny_model(kind, tok).save_pretrained(out[kind])
        tok.save_pretrained(out[kind])
    return out


def reranker(path, variant: str = "caption") -> Reranker:
    cap = HFVideoCaptioner.from_pretrained(path, device="cpu", num_frames=T, lora_rank=4, fps=1.0)
    with torch.no_grad():  # LoRA B starts at zero: give it values so the adapter path is exercised
        for n, p in cap.lm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return Reranker(RerankerConfig(variant=variant), cap).eval()


def clips(m: Reranker, b: int) -> torch.Tensor:
    S = m.captioner.frame_size
    return torch.randint(0, 256, (b, T, 3, S, S), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def plain_score(m: Reranker, frames: torch.Tensor, caption: str, query: str) -> torch.Tensor:
    """log-odds of Yes over No from one plain forward of the whole HF model (its own placeholder
    filling and positions) over [head][video][close][\\n caption][\\n query][tail]."""
    c, bb = m.captioner, m.backbone
    vid = getattr(c.hf_config, c.spec.video_token_attr)
    text = m._span(caption, 99) + m._span(query, 99) + m.tail_ids
    ids = torch.cat([bb.head_ids, torch.full((c.num_video_tokens,), vid), bb.close_ids, torch.tensor(text)])[None]
    logits = plain_logits(c, frames, ids)[-1]
    return logits[m.answer_ids[0]] - logits[m.answer_ids[1]]


@pytest.mark.parametrize("kind", FAMILY_NAMES)
def test_hf_reranker_with_prefix_reuse_scores_like_a_plain_forward(folders, kind):
    m = reranker(folders[kind])
    f = clips(m, 2)
    cand = torch.tensor([0, 1, 1, 0, 1])  # captions of different lengths: left padding in the prefix
    queries = [QUERIES[i] for i in (0, 0, 1, 2, 2)]
    with torch.no_grad():
        got = m.score_pairs(f, CAPS, queries, cand)
        want = torch.stack([plain_score(m, f[c], CAPS[c], q) for c, q in zip(cand.tolist(), queries)])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def one_twin_group() -> Dataset:
    """4 training clips of one twin group, two specific sentences each: a query is one of them, the
    candidates' captions the other. Sentences of different words (the tiny random LM barely tells
    apart sentences that differ in one token, as test_rerank.twin_data's do)."""
    words = ["a red circle moves left", "a blue square slides down", "the green star turns", "one yellow ring jumps"]
    videos = [Video(f"v{i}", f"/x/v{i}.mp4", "train", group="g0") for i in range(4)]
    sentences = [Sentence(f"v{i}", w + tail, "specific") for i, w in enumerate(words) for tail in ("", " again")]
    return Dataset(Path("/x"), videos, sentences)


def test_hf_reranker_training_lowers_the_loss_moves_lora_and_roles_and_leaves_the_base(folders, tmp_path):
    ds = one_twin_group()
    cap = reranker(folders["qwen2_vl"]).captioner
    base = {n: p.detach().clone() for n, p in cap.named_parameters() if "lora_" not in n}
    lora = {n: p.detach().clone() for n, p in cap.named_parameters() if "lora_" in n}
    S, g = cap.frame_size, torch.Generator().manual_seed(1)
    frames = {v.id: torch.randint(0, 256, (T, 3, S, S), generator=g, dtype=torch.uint8) for v in ds.videos}
    cfg = RerankerTrainConfig(
        model=RerankerConfig(variant="caption_role"), steps=30, units_per_step=1, candidates=4, lr=3e-3,
        head_lr=1e-3, warmup_steps=0,
    )  # fmt: skip
    model, _ = train_reranker(cfg, cap, ds, lambda ids: torch.stack([frames[v] for v in ids]), tmp_path, progress=False)
    losses = [r["loss"] for r in MetricsLog(tmp_path).rows()]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert all(torch.equal(p, base[n]) for n, p in model.captioner.named_parameters() if n in base)
    assert all(not torch.equal(p, lora[n]) for n, p in model.captioner.named_parameters() if "lora_B" in n)
    assert model.roles.weight.abs().sum() > 0
    back = Reranker.from_pretrained(tmp_path / "model")
    assert back.backbone.kind == "hf" and back.config.variant == "caption_role"
    f, queries, cand = clips(model, 2), QUERIES[:2] * 2, torch.tensor([0, 0, 1, 1])
    with torch.no_grad():
        torch.testing.assert_close(back.score_pairs(f, CAPS, queries, cand), model.score_pairs(f, CAPS, queries, cand))
