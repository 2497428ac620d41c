"""The interface every captioner backend implements (our small video LM, HF video MLLMs).

The preference stage and the DG-DPO trainer only talk to this protocol, so a backend is swapped
without touching them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Captioner(Protocol):
    def generate(
        self,
        features: torch.Tensor,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 32,
        seed: int | None = None,
    ) -> list[list[str]]:
        """Sample `n` captions per video. features: backend-specific visual input with a leading
        batch dim B (our default: the 2x2 grid features [B, T, 4, C]). Returns B lists of n
        strings. temperature == 0 means greedy. Deterministic for a given seed.
        A backend with the class attribute `seeds_per_video = True` also takes a sequence of B
        seeds: video i's captions then depend only on seed[i] (and its features), not on the rest
        of the batch; `generate_captions` relies on it to batch (else it calls one video at a time)."""
        ...

    def logprob(self, features: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """Summed log p(caption tokens | video, prompt) -> [B], one caption per video.
        Differentiable w.r.t. trainable parameters; padding and prompt are masked out."""
        ...


def load_captioner(captioner: str | Path, model_path: str | Path | None = None):
    """Our captioner from its folder, or (captioner "hf") a Hugging Face video MLLM (Qwen2-VL,
    Qwen2.5-VL, LLaVA-OneVision; family from its config.json) from the local folder `model_path`,
    which may also be a folder `caredpo dpo` saved (base path + LoRA adapter)."""
    if str(captioner) == "hf":
        if model_path is None:
            raise ValueError("captioner 'hf' needs a model path (a local Hugging Face model folder)")
        from .hf import HFVideoCaptioner

        return HFVideoCaptioner.from_pretrained(model_path)
    if model_path is not None:
        raise ValueError("a model path is only used with captioner 'hf'")
    from .model import VideoCaptioner

    return VideoCaptioner.from_pretrained(captioner)


def visual_source(captioner, dataset, store):
    """ids -> the captioner's visual input: decoded frames for an HF MLLM (it has `frames`), else
    the store's grid features."""
    return captioner.frames(dataset) if hasattr(captioner, "frames") else store.grid_feats
