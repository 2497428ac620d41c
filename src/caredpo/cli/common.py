"""Helpers shared by the stage commands."""
from __future__ import annotations

from pathlib import Path
from typing import Optional


def set_threads(n: int) -> None:
    """--threads: torch's intra-op threads (0 keeps torch's default). One per process is best when
    another job shares the cores: oversubscribed matmuls run many times slower."""
    if n > 0:
        import torch

        torch.set_num_threads(n)


def load_data(data: Path, features: Optional[Path]):
    """(Dataset, FeatureStore) of a data folder; features default to DATA/features."""
    from ..data import load_dataset
    from ..features import FeatureStore

    return load_dataset(data), FeatureStore.load(features or data / "features")
