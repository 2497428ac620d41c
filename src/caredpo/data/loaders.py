"""Loaders for the real benchmark layouts, all into the same `Dataset` records.

File formats follow the CLIP4Clip data releases (the de-facto standard for text-video retrieval):

- MSR-VTT: `MSRVTT_data.json` {"videos": [{"video_id", ...}], "sentences": [{"video_id", "caption"}]},
  `MSRVTT_train.9k.csv` (or `.7k.csv`, column `video_id`) for training and the JSFusion 1k-A test
  `MSRVTT_JSFUSION_test.csv` (columns key, vid_key, video_id, sentence): one query per test video.
- DiDeMo: `{train,val,test}_data.json`, lists of {"video", "description", "times", ...}; paragraph
  retrieval: a video's descriptions joined in order are its query. `*_list.txt` filter when present.
- ActivityNet Captions: `train.json`, `val_1.json` (the test split, as in CLIP4Clip), dicts
  {"v_<id>": {"duration", "timestamps", "sentences"}}; paragraph retrieval as DiDeMo.
- MSVD: `AllVideoDescriptions.txt` (lines "<video id> <caption>", '#' comments) with
  `train_list.txt` / `val_list.txt` / `test_list.txt`; every sentence of a test video is a query.
  (CLIP4Clip's `raw-captions.pkl` is a pickle: we do not unpickle files from the internet.)
- plain: `videos/` + `captions.csv` or `captions.jsonl`, one row per sentence with columns `video`,
  `caption` and an optional `split` (the names are options: `PlainColumns`), for your own data.

Videos are found anywhere under the data root by file name (`<id>.mp4`, `.webm`, `.avi`, ...).
A video without a file is kept (decoding reports it; `--skip-bad` skips it).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..io import read_json
from ..records import DataError, Dataset, Sentence, Video

VIDEO_EXTS = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v")


# ----------------------------------------------------------------------------- shared helpers


def _index_videos(root: Path) -> dict[str, str]:
    """File name and stem -> path relative to root, for every video file under root."""
    out: dict[str, str] = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name.lower().endswith(VIDEO_EXTS):
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                out.setdefault(name, rel)
                out.setdefault(os.path.splitext(name)[0], rel)
    return out


def _video_path(index: dict[str, str], vid: str, *aliases: str) -> str:
    """The file of a video (by id or alias), else the conventional `videos/<id>.mp4`."""
    for key in (vid, *aliases):
        if key in index:
            return index[key]
    return f"videos/{vid}.mp4"


def _require(entry: Any, keys: tuple[str, ...], where: str) -> None:
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object, got {type(entry).__name__}")
    for key in keys:
        if key not in entry:
            raise DataError(f"{where}: missing field {key!r}")


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: expected a non-empty sentence, got {value!r}")
    return value.strip()


def _read_csv(path: Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing} (header: {reader.fieldnames})")
        rows = list(reader)
    for i, row in enumerate(rows, start=2):
        for c in columns:
            if not (row.get(c) or "").strip():
                raise DataError(f"{path}: line {i}: empty {c!r}")
    return rows


def _read_list(path: Path) -> list[str] | None:
    if not path.exists():
        return None
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ----------------------------------------------------------------------------- MSR-VTT


def load_msrvtt(root: str | Path) -> Dataset:
    """MSR-VTT with the 9k (else 7k) training split and the JSFusion 1k-A test queries."""
    root = Path(root)
    data_path = root / "MSRVTT_data.json"
    data = read_json(data_path)
    _require(data, ("sentences",), str(data_path))
    captions = _msrvtt_captions(data["sentences"], data_path)
    train_csv = next((root / n for n in ("MSRVTT_train.9k.csv", "MSRVTT_train.7k.csv") if (root / n).exists()), None)
    train_ids = [r["video_id"].strip() for r in _read_csv(train_csv, ("video_id",))] if train_csv else []
    test_path = root / "MSRVTT_JSFUSION_test.csv"
    test_rows = _read_csv(test_path, ("video_id", "sentence")) if test_path.exists() else []
    if not train_ids and not test_rows:
        raise DataError(f"{root}: no MSRVTT_train.9k.csv / MSRVTT_train.7k.csv / MSRVTT_JSFUSION_test.csv")
    queries = {r["video_id"].strip(): [r["sentence"].strip()] for r in test_rows}
    for vid in train_ids:
        if vid not in captions:
            raise DataError(f"{train_csv}: video {vid!r} has no sentences in {data_path.name}")
    index = _index_videos(root)
    videos = [Video(v, _video_path(index, v), "train") for v in dict.fromkeys(train_ids) if v not in queries]
    videos += [Video(v, _video_path(index, v), "test") for v in queries]
    sentences = [Sentence(v.id, t) for v in videos for t in captions.get(v.id, [])]
    sentences += [Sentence(v, q[0]) for v, q in queries.items() if q[0] not in captions.get(v, [])]
    return Dataset(root, videos, sentences, queries, name="msrvtt")


def _msrvtt_captions(entries: Any, path: Path) -> dict[str, list[str]]:
    if not isinstance(entries, list):
        raise DataError(f"{path}: 'sentences' must be a list")
    out: dict[str, list[str]] = {}
    for i, s in enumerate(entries):
        where = f"{path}: sentences[{i}]"
        _require(s, ("video_id", "caption"), where)
        out.setdefault(str(s["video_id"]), []).append(_text(s["caption"], where))
    return out


# ----------------------------------------------------------------------------- paragraph retrieval


def _paragraph_dataset(
    root: Path,
    name: str,
    per_split: dict[str, dict[str, list[str]]],
    aliases: Callable[[str], tuple[str, ...]] = lambda v: (),
) -> Dataset:
    """Videos with their sentences; the query of an evaluation video is its sentences joined."""
    index = _index_videos(root)
    videos, sentences, queries = [], [], {}
    for split, by_video in per_split.items():
        for vid, texts in by_video.items():
            videos.append(Video(vid, _video_path(index, vid, *aliases(vid)), split))
            paragraph = " ".join(texts)
            sentences += [Sentence(vid, t) for t in texts]
            if len(texts) > 1:
                sentences.append(Sentence(vid, paragraph, "paragraph"))
            if split != "train":
                queries[vid] = [paragraph]
    return Dataset(root, videos, sentences, queries, name=name)


def load_didemo(root: str | Path) -> Dataset:
    """DiDeMo paragraph retrieval from `{train,val,test}_data.json` (+ optional `*_list.txt`)."""
    root = Path(root)
    per_split = {}
    for split in ("train", "val", "test"):
        path = root / f"{split}_data.json"
        if path.exists():
            per_split[split] = _didemo_split(path, _read_list(root / f"{split}_list.txt"))
    if not per_split:
        raise DataError(f"{root}: no train_data.json / val_data.json / test_data.json")
    return _paragraph_dataset(root, "didemo", per_split)


def _didemo_split(path: Path, keep: list[str] | None) -> dict[str, list[str]]:
    data = read_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of moments, got {type(data).__name__}")
    out: dict[str, list[str]] = {}
    for i, item in enumerate(data):
        where = f"{path}: entry {i}"
        _require(item, ("video", "description"), where)
        if keep is None or item["video"] in keep:
            out.setdefault(str(item["video"]), []).append(_text(item["description"], where))
    return out


def load_activitynet(root: str | Path) -> Dataset:
    """ActivityNet Captions paragraph retrieval: `train.json` -> train, `val_1.json` -> test."""
    root = Path(root)
    files = {"train": root / "train.json", "test": root / "val_1.json"}
    per_split = {split: _activitynet_split(p) for split, p in files.items() if p.exists()}
    if not per_split:
        raise DataError(f"{root}: no train.json / val_1.json")
    # Files are named `v_<id>.mp4` or `<id>.mp4` depending on the download script.
    return _paragraph_dataset(root, "activitynet", per_split, aliases=lambda v: (v[2:],) if v.startswith("v_") else ())


def _activitynet_split(path: Path) -> dict[str, list[str]]:
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected an object {{video_id: {{...}}}}, got {type(data).__name__}")
    out = {}
    for vid, item in data.items():
        where = f"{path}: video {vid!r}"
        _require(item, ("sentences",), where)
        if not isinstance(item["sentences"], list) or not item["sentences"]:
            raise DataError(f"{where}: 'sentences' must be a non-empty list")
        stamps = item.get("timestamps")
        if stamps is not None and len(stamps) != len(item["sentences"]):
            raise DataError(f"{where}: {len(stamps)} timestamps for {len(item['sentences'])} sentences")
        out[vid] = [_text(s, f"{where} sentence {k}") for k, s in enumerate(item["sentences"])]
    return out


# ----------------------------------------------------------------------------- MSVD


def load_msvd(root: str | Path) -> Dataset:
    """MSVD multi-caption retrieval: every sentence of a test video is a query."""
    root = Path(root)
    captions = _msvd_captions(root / "AllVideoDescriptions.txt")
    lists = {s: _read_list(root / f"{s}_list.txt") for s in ("train", "val", "test")}
    if all(v is None for v in lists.values()):
        raise DataError(f"{root}: no train_list.txt / val_list.txt / test_list.txt")
    index = _index_videos(root)
    videos = []
    for split, ids in lists.items():
        for vid in ids or []:
            if vid not in captions:
                raise DataError(
                    f"{root / f'{split}_list.txt'}: video {vid!r} has no captions in AllVideoDescriptions.txt"
                )
            videos.append(Video(vid, _video_path(index, vid), split))
    sentences = [Sentence(v.id, t) for v in videos for t in captions[v.id]]
    return Dataset(root, videos, sentences, {}, name="msvd")


def _msvd_captions(path: Path) -> dict[str, list[str]]:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    out: dict[str, list[str]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        vid, _, caption = line.partition(" ")
        if not caption.strip():
            raise DataError(f"{path}: line {n}: expected '<video id> <caption>', got {line!r}")
        out.setdefault(vid, []).append(caption.strip())
    return out


# ----------------------------------------------------------------------------- plain layout


@dataclass(frozen=True)
class PlainColumns:
    """Column names of the plain layout (open_clip's CSV-dataset convention: the keys are options)."""

    video_column: str = "video"  # plain layout: the column naming the video file (extension optional); "video"
    caption_column: str = "caption"  # plain layout: the column holding one sentence of it; "caption"
    split_column: str = "split"  # plain layout: the optional column train / val / test; "split"
    separator: str = ","  # plain layout: the field separator of captions.csv; ","


PLAIN_FILES = ("captions.csv", "captions.jsonl")
SPLITS = ("train", "val", "test")


def load_plain(root: str | Path, columns: PlainColumns = PlainColumns()) -> Dataset:
    """`videos/` + `captions.csv` or `captions.jsonl`: one row per sentence (video, caption[, split]).

    A video is named by its file (`clip1.mp4`, or `clip1` for any extension); its id is the name
    without the extension. A video whose file is missing is kept, with the row that names it as its
    `source` (the run reports it, or skips it with --skip-bad). Without a split column every video
    is "train"; `caredpo run` then holds out a seeded test split (`caredpo.data.splits`)."""
    root = Path(root)
    path = next((root / n for n in PLAIN_FILES if (root / n).is_file()), None)
    if path is None:
        raise DataError(f"{root}: no {' or '.join(PLAIN_FILES)}")
    index = _index_videos(root)
    videos: dict[str, Video] = {}
    sentences = []
    for where, row in _plain_rows(path, columns):
        name = _cell(row, columns.video_column, where, "no video named")
        text = _cell(row, columns.caption_column, where, "empty caption")
        split = _plain_split(row, columns.split_column, where)
        vid = os.path.splitext(name)[0] if name.lower().endswith(VIDEO_EXTS) else name
        video = videos.setdefault(vid, Video(vid, _plain_path(root, index, name, vid), split, source=where))
        if video.split != split:
            raise DataError(f"{where}: video {vid!r} is in split {split!r} here, {video.split!r} at {video.source}")
        sentences.append(Sentence(vid, text))
    return Dataset(root, list(videos.values()), sentences, {}, name="plain")


def _plain_rows(path: Path, columns: PlainColumns) -> list[tuple[str, dict]]:
    """(where, row) per sentence row; `where` is "FILE: line N" for error messages."""
    return (_csv_rows if path.suffix == ".csv" else _jsonl_rows)(path, columns)


def _csv_rows(path: Path, columns: PlainColumns) -> list[tuple[str, dict]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=columns.separator)
        missing = [c for c in (columns.video_column, columns.caption_column) if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(
                f"{path}: missing column(s) {missing} (header: {reader.fieldnames}); name yours with the column options"
            )
        return [(f"{path}: line {reader.line_num}", row) for row in reader]


def _jsonl_rows(path: Path, columns: PlainColumns) -> list[tuple[str, dict]]:
    import json

    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}: line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg})") from None
        _require(row, (columns.video_column, columns.caption_column), where)
        out.append((where, row))
    return out


def _cell(row: dict, column: str, where: str, empty: str) -> str:
    value = row.get(column)
    if value is None or not str(value).strip():
        raise DataError(f"{where}: {empty} (column {column!r})")
    return str(value).strip()


def _plain_split(row: dict, column: str, where: str) -> str:
    if column not in row:
        return "train"
    split = _cell(row, column, where, "empty split").lower()
    if split not in SPLITS:
        raise DataError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}")
    return split


def _plain_path(root: Path, index: dict[str, str], name: str, vid: str) -> str:
    """videos/NAME if it is there, else the file found by name or id anywhere under root, else
    the conventional videos/NAME (missing: the run says so)."""
    if (root / "videos" / name).is_file():
        return f"videos/{name}"
    return index.get(name) or index.get(vid) or f"videos/{name if name != vid else vid + '.mp4'}"
