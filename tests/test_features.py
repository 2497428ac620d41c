"""Frame features: shapes, storage contract, skip-bad report, cache reuse and resume."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from caredpo import features as feat
from caredpo.colour import cell_colour_histograms
from caredpo.features import FeatureConfig, FeatureStore, extract_features
from caredpo.records import DataError, Dataset, Sentence, Video
from caredpo.video import VideoError

CFG = FeatureConfig(num_frames=4, size=32, batch_size=8, shard_size=2)


def _dataset(root, mp4_factory, n=5, bad=()):
    videos = []
    for i in range(n):
        name = f"videos/v{i}.mp4"
        if i in bad:
            (root / "videos").mkdir(exist_ok=True)
            (root / name).write_text("not a video")
        else:
            mp4_factory(name, num_frames=8, size=32, seed=i)
        videos.append(Video(f"v{i}", name, "train"))
    (root / "annotations.json").write_text("{}")
    return Dataset(root, videos, [Sentence(v.id, f"clip {v.id}") for v in videos])


@pytest.fixture
def decode_counter(monkeypatch):
    calls = []
    real = feat.read_frames

    def counting(path, *args):
        calls.append(path.name)
        return real(path, *args)

    monkeypatch.setattr(feat, "read_frames", counting)
    return calls


def test_config_validation():
    with pytest.raises(ValueError, match="num_frames"):
        FeatureConfig(num_frames=0)
    with pytest.raises(ValueError, match="size"):
        FeatureConfig(size=16)


def test_encoder_loads_wheel_weights_and_pools():
    model = feat.load_frame_encoder(64)
    x = feat.preprocess(np.random.default_rng(0).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8))
    g, m = feat.encode_frames(model, x)
    assert g.shape == (3, 1280) and m.shape == (3, 4, 1280)
    # 64 px -> a 2x2 map: the grid cells are the map itself, and their mean is the global vector.
    torch.testing.assert_close(m.mean(1), g, rtol=1e-4, atol=1e-5)
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_fused_encoder_matches_the_plain_one():
    x = feat.preprocess(np.random.default_rng(1).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8))
    plain, fused = feat.load_frame_encoder(64, fuse=False), feat.load_frame_encoder(64)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    for a, b in zip(feat.encode_frames(plain, x), feat.encode_frames(fused, x)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_extract_writes_the_contract(tmp_path, mp4_factory):
    ds = _dataset(tmp_path, mp4_factory)
    out = extract_features(ds, tmp_path / "features", CFG, progress=False)
    meta = json.loads((out / "features.json").read_text())
    assert meta["model"] == "efficientnet-lite0" and meta["num_frames"] == 4 and meta["size"] == 32
    assert meta["grid"] == 2 and meta["video_ids"] == [f"v{i}" for i in range(5)] and meta["skipped"] == []
    from safetensors.torch import load_file

    t = load_file(str(out / "features.safetensors"))
    assert t["global"].dtype == torch.float16 and t["global"].shape == (5, 4, 1280)
    assert t["grid"].shape == (5, 4, 4, 1280) and t["colour"].shape == (5, 4, 4, 64)
    assert not (out / "shards").exists()
    store = FeatureStore.load(out)
    assert store.ids == meta["video_ids"] and store.feature_dim == 1280 and store.num_frames == 4
    g = store.global_feats(["v3", "v0"])
    assert g.dtype == torch.float32 and g.shape == (2, 4, 1280)
    torch.testing.assert_close(g[1], t["global"][0].float())
    assert store.grid_feats(["v1"]).shape == (1, 4, 4, 1280 + 64)  # CNN channels, then colour bins
    assert not torch.equal(g[0], g[1])  # different clips, different features
    with pytest.raises(DataError, match="no features for video 'v9'"):
        store.global_feats(["v9"])


def test_features_match_direct_encoding(tmp_path, mp4_factory):
    """Batched, threaded extraction equals encoding one clip by hand (to float16 precision)."""
    ds = _dataset(tmp_path, mp4_factory, n=3)
    store = FeatureStore.load(extract_features(ds, tmp_path / "f", CFG, progress=False))
    frames = feat.read_frames(tmp_path / "videos/v2.mp4", 4, 32)
    g, m = feat.encode_frames(feat.load_frame_encoder(32), feat.preprocess(frames))
    torch.testing.assert_close(store.global_feats(["v2"])[0], g, rtol=2e-3, atol=2e-3)
    cells = store.grid_feats(["v2"])[0]  # [T, 4, 1280 + 64]
    torch.testing.assert_close(cells[..., :1280], m, rtol=2e-3, atol=2e-3)
    hist = cell_colour_histograms(torch.from_numpy(frames))
    torch.testing.assert_close(cells[..., 1280:], hist, rtol=2e-3, atol=2e-3)


def test_colour_can_be_left_out(tmp_path, mp4_factory):
    ds = _dataset(tmp_path, mp4_factory, n=2)
    store = FeatureStore.load(extract_features(ds, tmp_path / "f", replace(CFG, colour_levels=0), progress=False))
    assert store.grid_feats(["v0"]).shape == (1, 4, 4, 1280)


def test_bad_video_stops_with_one_line(tmp_path, mp4_factory):
    ds = _dataset(tmp_path, mp4_factory, n=3, bad={1})
    with pytest.raises(VideoError) as info:
        extract_features(ds, tmp_path / "f", CFG, progress=False)
    assert str(info.value).startswith(str(tmp_path / "videos/v1.mp4") + ": ")
    assert "\n" not in str(info.value)


def test_skip_bad_reports(tmp_path, mp4_factory):
    ds = _dataset(tmp_path, mp4_factory, n=4, bad={1})
    (tmp_path / "videos/v3.mp4").unlink()  # a missing file too
    out = extract_features(ds, tmp_path / "f", CFG, skip_bad=True, progress=False)
    store = FeatureStore.load(out)
    assert store.ids == ["v0", "v2"]
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [s["id"] for s in skipped] == ["v1", "v3"] and skipped == store.meta["skipped"]
    assert skipped[0]["path"] == "videos/v1.mp4" and "not a readable video" in skipped[0]["reason"]
    assert "file not found" in skipped[1]["reason"]
    # A later run without skip_bad does not silently accept the gaps.
    with pytest.raises(DataError, match="skipped"):
        extract_features(ds, tmp_path / "f", CFG, progress=False)


def test_second_run_reuses_cache(tmp_path, mp4_factory, decode_counter):
    ds = _dataset(tmp_path, mp4_factory)
    out = extract_features(ds, tmp_path / "f", CFG, progress=False)
    assert len(decode_counter) == 5
    stamp = (out / "features.safetensors").stat().st_mtime_ns
    extract_features(ds, tmp_path / "f", CFG, progress=False)
    assert len(decode_counter) == 5  # nothing decoded again
    assert (out / "features.safetensors").stat().st_mtime_ns == stamp


def test_changed_config_or_data_recomputes(tmp_path, mp4_factory, decode_counter, capsys):
    ds = _dataset(tmp_path, mp4_factory, n=2)
    out = extract_features(ds, tmp_path / "f", CFG, progress=False)
    extract_features(ds, out, FeatureConfig(num_frames=2, size=32, shard_size=2), progress=False)
    assert len(decode_counter) == 4 and "num_frames 4 -> 2" in capsys.readouterr().err
    assert FeatureStore.load(out).num_frames == 2
    (tmp_path / "annotations.json").write_text('{"changed": 1}')
    extract_features(ds, out, FeatureConfig(num_frames=2, size=32, shard_size=2), progress=False)
    assert len(decode_counter) == 6 and "data_hash" in capsys.readouterr().err


def test_resume_after_interruption(tmp_path, mp4_factory, decode_counter, monkeypatch):
    ds = _dataset(tmp_path, mp4_factory)
    full = FeatureStore.load(extract_features(ds, tmp_path / "full", CFG, progress=False))
    decode_counter.clear()
    # Interrupt the second run while it writes shard 2 (videos v4): shards 0 and 1 survive.
    real_write = feat._write_shard

    def dying_write(path, *args):
        if path.name == "shard-00002.safetensors":
            raise KeyboardInterrupt
        real_write(path, *args)

    monkeypatch.setattr(feat, "_write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        extract_features(ds, tmp_path / "part", CFG, progress=False)
    assert sorted(p.name for p in (tmp_path / "part/shards").iterdir()) == [
        "shard-00000.safetensors",
        "shard-00001.safetensors",
    ]
    monkeypatch.setattr(feat, "_write_shard", real_write)
    decode_counter.clear()
    resumed = FeatureStore.load(extract_features(ds, tmp_path / "part", CFG, progress=False))
    assert decode_counter == ["v4.mp4"]  # only the missing shard was computed
    assert resumed.ids == full.ids
    torch.testing.assert_close(resumed.global_feats(full.ids), full.global_feats(full.ids), rtol=0, atol=0)
    torch.testing.assert_close(resumed.grid_feats(full.ids), full.grid_feats(full.ids), rtol=0, atol=0)


def test_inline_decoding_gives_same_features(tmp_path, mp4_factory):
    ds = _dataset(tmp_path, mp4_factory, n=3)
    a = FeatureStore.load(extract_features(ds, tmp_path / "a", CFG, progress=False))
    cfg = FeatureConfig(num_frames=4, size=32, batch_size=4, shard_size=64, decode_workers=0, channels_last=False)
    b = FeatureStore.load(extract_features(ds, tmp_path / "b", cfg, progress=False))
    torch.testing.assert_close(a.grid_feats(a.ids), b.grid_feats(a.ids), rtol=2e-3, atol=2e-3)
