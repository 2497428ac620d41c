"""CaRe-DPO: video captions tuned with Dual-Group DPO on retrieval relevance, and a retriever
with role embeddings.

Importing the package has no side effects (no logging set-up, no process groups, no downloads,
not even a torch import): the public functions below load their module on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "retrieval_metrics": "caredpo.retrieval.metrics",
    "twin_accuracy": "caredpo.retrieval.metrics",
    "dpo_loss": "caredpo.dpo.loss",
    "dg_dpo_loss": "caredpo.dpo.loss",
    "load_dataset": "caredpo.data",
    "Dataset": "caredpo.records",
    "Video": "caredpo.records",
    "Sentence": "caredpo.records",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'caredpo' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
