"""Data sets: `load_dataset(path)` reads TwinClips, a real benchmark layout or the plain layout into
a `Dataset`.

The format is detected from the files present (see `MARKERS`) or named explicitly. TwinClips is
loaded by `caredpo.data.twinclips` (imported lazily: it pulls in the generator).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ..records import DataError, Dataset
from . import loaders
from .loaders import PlainColumns


def _load_twinclips(root: Path) -> Dataset:
    from .twinclips import load_twinclips

    return load_twinclips(root)


# format name -> loader(root) -> Dataset
LOADERS: dict[str, Callable[[Path], Dataset]] = {
    "twinclips": _load_twinclips,
    "msrvtt": loaders.load_msrvtt,
    "didemo": loaders.load_didemo,
    "activitynet": loaders.load_activitynet,
    "msvd": loaders.load_msvd,
    "plain": loaders.load_plain,
}

# format name -> files whose presence identifies it (any one), checked in this order
MARKERS: dict[str, tuple[str, ...]] = {
    "twinclips": ("annotations.json",),
    "msrvtt": ("MSRVTT_data.json",),
    "didemo": ("train_data.json", "val_data.json", "test_data.json"),
    "activitynet": ("val_1.json", "train.json"),
    "msvd": ("AllVideoDescriptions.txt",),
    "plain": loaders.PLAIN_FILES,
}


def detect_format(root: str | Path) -> str:
    root = Path(root)
    for name, files in MARKERS.items():
        if any((root / f).is_file() for f in files):
            return name
    expected = ", ".join(f"{k} ({'/'.join(v)})" for k, v in MARKERS.items())
    raise DataError(f"{root}: no known annotation file; expected one of: {expected}")


def load_dataset(path: str | Path, format: str = "auto", columns: PlainColumns | None = None) -> Dataset:
    """Read a data directory (or its annotation file) in any supported format; `columns` names the
    plain layout's columns (only that layout has them)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    root = path.parent if path.is_file() else path
    name = detect_format(root) if format == "auto" else format
    if name not in LOADERS:
        raise DataError(f"{path}: unknown data format {name!r}; choose from auto, {', '.join(LOADERS)}")
    if columns is not None and name != "plain":
        raise DataError(
            f"{path}: column names are options of the plain layout ({' / '.join(loaders.PLAIN_FILES)}), not of {name}"
        )
    return loaders.load_plain(root, columns) if columns is not None else LOADERS[name](root)


@dataclass(frozen=True)
class DataSource:
    """How a run reads its data set: folder, format, plain-layout columns (kept in run.json)."""

    path: Path
    format: str = "auto"
    columns: PlainColumns | None = None

    def load(self) -> Dataset:
        return load_dataset(self.path, self.format, self.columns)

    def to_dict(self) -> dict:
        return {
            "path": str(self.path),
            "format": self.format,
            "columns": asdict(self.columns) if self.columns else None,
        }

    @classmethod
    def from_dict(cls, d: dict) -> DataSource:
        columns = PlainColumns(**d["columns"]) if d.get("columns") else None
        return cls(Path(d["path"]), d.get("format", "auto"), columns)


__all__ = ["LOADERS", "MARKERS", "DataSource", "PlainColumns", "detect_format", "load_dataset"]
