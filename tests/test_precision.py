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
