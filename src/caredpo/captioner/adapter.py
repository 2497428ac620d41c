"""LoRA adapters of both captioner backends: wrap, save and load (peft), in one format.

A saved captioner keeps its adapter in `<folder>/adapter/` (peft's `adapter_model.safetensors` and
`adapter_config.json`); loading refuses weights that do not fit the model instead of skipping them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..records import DataError

ADAPTER_DIR = "adapter"
ADAPTER_FILE = "adapter_model.safetensors"


def add_lora(model, seed: int, **lora: object):
    """`model` wrapped by peft with LoraConfig(**lora); the adapters' init draws from `seed` only,
    so building a captioner leaves the global RNG where it was."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(**lora)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def save_adapter(peft_model, folder: Path) -> None:
    """LoRA weights and config into folder/adapter/."""
    peft_model.save_pretrained(Path(folder) / ADAPTER_DIR)


def load_adapter(peft_model, folder: str | Path) -> None:
    """LoRA weights from folder/adapter/ (or from a peft adapter folder itself) into `peft_model`."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    folder = folder / ADAPTER_DIR if (folder / ADAPTER_DIR).is_dir() else folder
    file = folder / ADAPTER_FILE
    if not file.exists():
        raise DataError(f"{folder}: no {ADAPTER_FILE} (not a LoRA adapter folder)")
    result = set_peft_model_state_dict(peft_model, load_file(str(file)))
    if getattr(result, "unexpected_keys", None):
        raise DataError(f"{folder}: adapter does not fit the model ({result.unexpected_keys[:3]} ...)")
