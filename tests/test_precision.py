"""precision = auto | fp32 | bf16: what each means, and bad values named in one line."""

from __future__ import annotations

import pytest
import torch

from caredpo import precision
from caredpo.captioner.model import CaptionerConfig
from caredpo.retrieval.model import RetrieverConfig


def test_resolve_and_autocast():
    assert precision.resolve("fp32") == "fp32" and precision.resolve("bf16") == "bf16"
    assert precision.resolve("auto") == ("bf16" if precision.cpu_has_bf16() else "fp32")
    assert precision.resolve("auto", "cuda") == "bf16"
    a, b = torch.randn(4, 8), torch.randn(8, 4)
    with precision.autocast("fp32"):
        assert (a @ b).dtype == torch.float32
    with precision.autocast("bf16"):
        assert (a @ b).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "make",
    [
        lambda: CaptionerConfig(lm="tiny", precision="fp16"),
        lambda: RetrieverConfig(text_encoder="tiny", precision="half"),
    ],
)
def test_unknown_precision_is_named(make):
    with pytest.raises(ValueError, match=r"\.precision must be one of"):
        make()


def test_frozen_weights_kept_in_bf16_change_no_number():
    """A bf16 captioner stores its frozen base Linears in bf16 (autocast would cast them at every
    call); log-probs, their gradients and greedy captions equal, bit for bit, those of the same
    weights kept in fp32 under the same autocast. The input embedding stays fp32."""
    from dataclasses import replace

    from caredpo.captioner.model import VideoCaptioner

    cfg = CaptionerConfig(
        lm="tiny", feature_dim=16, num_frames=2, projector_hidden=32, lora_layers=-1, lora_rank=4, precision="bf16"
    )
    stored = VideoCaptioner(cfg)
    plain = VideoCaptioner(replace(cfg, precision="fp32"))  # same seeds: the same fp32 weights
    plain.config = cfg  # ... run under the same bf16 autocast
    q = stored.base_lm.model.layers[0].self_attn.q_proj.base_layer.weight
    q_plain = plain.base_lm.model.layers[0].self_attn.q_proj.base_layer.weight
    assert q.dtype == torch.bfloat16 and q_plain.dtype == torch.float32 and not torch.equal(q.float(), q_plain)
    assert stored.lm_head.weight.dtype == torch.bfloat16 and stored.embed.weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in stored.trainable_parameters())
    feats, caps = torch.randn(3, 2, 4, 16, generator=torch.Generator().manual_seed(0)), ["a red ring", "b", "a c d"]
    grads = []
    for m in (stored, plain):
        with torch.no_grad():  # LoRA B starts at zero: give it values so the adapter path counts
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
        lp = m.logprob(feats, caps)
        lp.sum().backward()
        grads.append((lp.detach(), [p.grad.clone() for p in m.trainable_parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.equal(a, b) for a, b in zip(grads[0][1], grads[1][1]))
    with torch.no_grad():
        assert stored.generate(feats, temperature=0.0, max_new_tokens=8) == plain.generate(
            feats, temperature=0.0, max_new_tokens=8
        )
