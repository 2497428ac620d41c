"""Small file helpers: atomic writes and append-only JSONL that resumes without duplicates.

Sharded JSONL (one writer per process under torchrun): each process appends to its own
`NAME.part<rank>`; when all are done, rank 0 folds them into NAME with `merge_parts`.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write via a temp file in the same folder + rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    from .records import DataError

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None


# field name -> the type(s) its value must have, e.g. {"video_id": str, "captions": list}
Fields = Mapping[str, "type | tuple[type, ...]"]


def read_jsonl(path: str | Path, fields: Fields | None = None) -> Iterator[dict]:
    """The JSON objects of a JSONL file, in order. Complete lines only: a torn last line (killed
    writer) is ignored, not an error; blank lines are skipped. A bad line raises `DataError`
    "FILE:LINE: reason" (not valid JSON, not an object, or a field of `fields` missing or of the
    wrong type). A missing file yields nothing (a log not started yet)."""
    for _, row in numbered_jsonl(path, fields):
        yield row


def numbered_jsonl(path: str | Path, fields: Fields | None = None) -> Iterator[tuple[int, dict]]:
    """(1-based line number, object) for each line, checked as in `read_jsonl`."""
    path = Path(path)
    if not path.exists():
        return
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.endswith("\n"):
                break
            if line.strip():
                yield n, parse_jsonl_line(path, n, line, fields)


def parse_jsonl_line(path: str | Path, n: int, line: str, fields: Fields | None = None) -> dict:
    """One JSONL line -> its object, or `DataError` "FILE:N: reason" naming what is wrong."""
    from .records import DataError

    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise DataError(f"{path}:{n}: expected a JSON object, got {_json_type(row)}")
    problem = field_problem(row, fields or {})
    if problem:
        raise DataError(f"{path}:{n}: {problem}")
    return row


def field_problem(row: Mapping[str, Any], fields: Fields) -> str | None:
    """What is wrong with `row` for `fields` (a missing field, a value of the wrong type), or None."""
    for name, kind in fields.items():
        if name not in row:
            return f'missing field "{name}"'
        kinds = kind if isinstance(kind, tuple) else (kind,)
        value = row[name]
        # bool is an int to Python, not to JSON: true is no count and no index
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            want = " or ".join(_JSON_NAMES.get(k, k.__name__) for k in kinds)
            return f'field "{name}" must be {want}, got {_json_type(value)}'
    return None


_JSON_NAMES = {
    str: "a string",
    list: "a list",
    dict: "an object",
    int: "an integer",
    float: "a number",
    bool: "true/false",
}


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value, for messages."""
    if value is None:
        return "null"
    return _JSON_NAMES.get(type(value), type(value).__name__)


def append_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """Append whole lines and fsync; with `read_jsonl` this makes a resumable log."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _truncate_torn_tail(path)
    with path.open("a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _truncate_torn_tail(path: Path) -> None:
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


# ---- sharded jsonl -------------------------------------------------------------------------------


def part_path(path: str | Path, rank: int) -> Path:
    """Process `rank`'s part of a sharded jsonl: NAME.part<rank> next to NAME."""
    path = Path(path)
    return path.with_name(f"{path.name}.part{rank}")


def part_paths(path: str | Path) -> list[Path]:
    """The part files of `path` that exist (from any earlier world size), in rank order."""
    path = Path(path)
    pattern = re.compile(re.escape(path.name) + r"\.part(\d+)")
    found = [
        (int(m.group(1)), p)
        for p in path.parent.glob(glob.escape(path.name) + ".part*")
        if (m := pattern.fullmatch(p.name))
    ]
    return [p for _, p in sorted(found)]


def _whole_lines(path: Path) -> list[str]:
    """Complete lines only (a torn tail is dropped, as in `read_jsonl`)."""
    if not path.exists():
        return []
    return [line + "\n" for line in path.read_text(encoding="utf-8").split("\n")[:-1]]


def merge_parts(path: str | Path, order: Sequence[str], key: str = "video_id") -> int:
    """Fold the part files into `path` (atomic write), then delete them; returns the rows added.

    `path`'s own rows stay first, verbatim; then the parts' rows whose `key` is not there yet, in
    the order of `order` (keys not in it last, in part order). A key seen twice is kept once, so a
    merge interrupted after its write and rerun changes nothing."""
    path = Path(path)
    parts = part_paths(path)
    if not parts:
        return 0
    kept = _whole_lines(path)
    seen = {parse_jsonl_line(path, n, line, {key: str})[key] for n, line in enumerate(kept, 1)}
    new: dict[str, str] = {}
    for part in parts:
        for n, line in enumerate(_whole_lines(part), 1):
            k = parse_jsonl_line(part, n, line, {key: str})[key]
            if k not in seen:
                new.setdefault(k, line)
    pos = {k: i for i, k in enumerate(order)}
    added = sorted(new, key=lambda k: pos.get(k, len(pos)))  # stable: unknown keys keep part order
    atomic_write_text(path, "".join(kept + [new[k] for k in added]))
    for part in parts:
        part.unlink()
    return len(added)
