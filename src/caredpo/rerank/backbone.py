"""The captioner a reranker starts from, behind one small interface (`backbone`).

The reranker's sequence is [head][visual][close][\\n caption][\\n query][tail]; what differs by backend:

    caredpo (VideoCaptioner, grid features)  head "<|im_start|>user\\n", visual = projector tokens,
                                             close = nothing, 1-D positions
    hf (HFVideoCaptioner, raw frames)        the family's chat template cut at its video slot, e.g.
                                             Qwen2-VL: head "... <|vision_start|>", visual = vision
                                             tower tokens (frozen, no grad), close "<|vision_end|>";
                                             M-RoPE positions [3, U, L]

The reranker counts 1-D positions per row (0 = a row's first real token); `positions` maps them to
what the decoder reads. For Qwen the head and visual tokens take the model's own `get_rope_index`
positions (the captioner's `prefix_pos`) and every later text token follows on from the largest.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .. import precision
from ..captioner.model import CHAT_FORMATS, VideoCaptioner


class OwnBackbone:
    """Our `VideoCaptioner` (projector + SmolLM2 + LoRA) on the data's grid features."""

    kind = "caredpo"

    def __init__(self, captioner: VideoCaptioner):
        self.captioner = captioner
        self.tokenizer, self.pad_id = captioner.tokenizer, captioner.pad_id
        self.decoder, self.cache_config = captioner.decoder, captioner.base_lm.config
        self.embed, self.lm_head = captioner.embed, captioner.lm_head
        self.head_ids, self.close_ids = captioner.head_ids, captioner.head_ids[:0]
        self.tail = CHAT_FORMATS[captioner.config.chat_format][1]  # "\n{prompt}<|im_end|>..."
        self.bf16_weights = precision.resolve(captioner.config.precision) == "bf16"  # base Linears in bf16

    def visual(self, features: Tensor) -> Tensor:
        """Grid features [U, T, G, C] -> visual tokens [U, V, d] (the projector stays frozen)."""
        return self.captioner.projector(self.captioner.visual_input(features))

    def positions(self, pos: Tensor) -> Tensor:
        return pos

    def set_trainable(self) -> None:
        self.captioner.set_trainable(projector=False, lora=True)

    @staticmethod
    def load(path: Path, device) -> VideoCaptioner:
        return VideoCaptioner.from_pretrained(path, device=device or "cpu")


class HFBackbone:
    """A Hugging Face video MLLM (`HFVideoCaptioner`: Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision + LoRA)."""

    kind = "hf"

    def __init__(self, captioner):
        c = captioner
        self.captioner = c
        self.tokenizer, self.pad_id = c.tokenizer, c.pad_id
        self.decoder, self.cache_config = c.text, c.text.config
        self.embed, self.lm_head = c.embed, c.lm_head
        between, after = c.spec.template.split("{video}")[1].split("{prompt}")
        close = c.tokenizer(between.strip(), add_special_tokens=False).input_ids  # Qwen: <|vision_end|>
        self.head_ids = c.head_ids
        self.close_ids = torch.tensor(close, dtype=torch.long, device=c.device)
        self.tail = "\n{prompt}" + after
        fixed = len(c.head_ids) + c.num_video_tokens
        self.bf16_weights = False  # the model's own dtype (HFCaptionerConfig.dtype), autocast or not
        self.fixed_pos = c.prefix_pos[..., :fixed]  # [(3,) 1, F]: head + visual tokens
        self.next_pos = int(self.fixed_pos.max()) + 1

    def visual(self, frames: Tensor) -> Tensor:
        """Frames [U, T, 3, H, W] -> vision-tower tokens [U, N, d]."""
        return self.captioner.video_embeds(self.captioner.visual_input(frames))

    def positions(self, pos: Tensor) -> Tensor:
        """1-D positions [U, L] -> the model's: the prompt's own for head + visual, then text."""
        lead, F = self.fixed_pos.shape[:-2], self.fixed_pos.shape[-1]
        table = self.fixed_pos.expand(*lead, pos.shape[0], F)
        own = table.gather(-1, pos.clamp(max=F - 1).expand(*lead, *pos.shape))
        return torch.where(pos < F, own, pos - F + self.next_pos)

    def set_trainable(self) -> None:
        self.captioner.set_trainable(lora=True)

    @staticmethod
    def load(path: Path, device):
        from ..captioner.hf import HFVideoCaptioner

        return HFVideoCaptioner.from_pretrained(path, device=device)


BACKBONES = {b.kind: b for b in (OwnBackbone, HFBackbone)}


def backbone(captioner) -> OwnBackbone | HFBackbone:
    """The backbone view of a captioner: `HFVideoCaptioner` -> hf, `VideoCaptioner` -> caredpo."""
    return OwnBackbone(captioner) if isinstance(captioner, VideoCaptioner) else HFBackbone(captioner)
