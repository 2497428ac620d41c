"""Mixed precision: `precision = "auto" | "fp32" | "bf16"` for every model that runs or trains.

bf16 means autocast (matmuls and attention in bf16, accumulation in fp32) with fp32 trainable
weights, gradients and optimizer state (frozen Linears may be stored in bf16, which changes no
number: `store_frozen_linears_in_bf16`); log-softmax, summed log-probs and DPO log-ratios stay fp32 because
the code upcasts before them. `auto` takes bf16 on CUDA and on CPUs with native bf16 matmul
(AVX512-BF16 or AMX), where it is faster than fp32 (docs/results.md, "Precision"); fp32 elsewhere.
Why each part runs where it does: docs/design.md, "Precision".
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16")
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def check(precision: str, owner: str) -> None:
    """Raise a one-line error naming the config field when `precision` is not a known choice."""
    if precision not in PRECISIONS:
        raise ValueError(f"{owner}.precision must be one of {PRECISIONS}, got {precision!r}")


@functools.cache
def cpu_has_bf16() -> bool:
    """True where the CPU multiplies bf16 natively (Linux: the flags in /proc/cpuinfo)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return any(f in flags for f in _CPU_BF16_FLAGS)


def resolve(precision: str, device: str | torch.device = "cpu") -> str:
    """ "fp32" or "bf16": what `precision` means on `device`."""
    if precision != "auto":
        return precision
    if torch.device(device).type == "cuda":
        return "bf16"
    return "bf16" if cpu_has_bf16() else "fp32"


def autocast(precision: str, device: str | torch.device = "cpu"):
    """The context a forward pass runs in: bf16 autocast, or nothing for fp32."""
    device = torch.device(device)
    if resolve(precision, device) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def store_frozen_linears_in_bf16(module: torch.nn.Module) -> int:
    """Keep the frozen `nn.Linear` weights of `module` in bf16; returns how many were converted.

    Under bf16 autocast a matmul casts an fp32 weight to bf16 on every call: autocast caches the
    cast only for trainable leaves, so a frozen base LM is converted again at each decoding step.
    A bf16 copy made once gives the same products bit for bit (the same rounding, done once).
    Trainable weights (LoRA) stay fp32; a weight shared with another module (SmolLM2's lm_head
    is its input embedding) gets its own bf16 copy, so the embedding lookup keeps fp32 values.
    Only for modules whose every forward runs under bf16 autocast."""
    done = 0
    for name, mod in module.named_modules():
        if type(mod) is torch.nn.Linear and not mod.weight.requires_grad and "lora_" not in name:
            if mod.weight.dtype == torch.float32:
                mod.weight = torch.nn.Parameter(mod.weight.detach().to(torch.bfloat16), requires_grad=False)
                done += 1
    return done
