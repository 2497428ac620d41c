"""Real benchmark layouts (CLIP4Clip file formats) read into `Dataset`; malformed files fail clearly."""

from __future__ import annotations

import json

import pytest

from caredpo.cli import main
from caredpo.data import detect_format, load_dataset
from caredpo.records import DataError


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def msrvtt(tmp_path, mp4_factory):
    for vid in ("video0", "video1", "video2"):
        mp4_factory(f"MSRVTT/videos/all/{vid}.mp4")
    root = tmp_path / "MSRVTT"
    data = {
        "videos": [{"video_id": f"video{i}", "url": "u", "split": "train"} for i in range(3)],
        "sentences": [
            {"video_id": "video0", "caption": "a man cooks", "sen_id": 0},
            {"video_id": "video0", "caption": "someone is cooking", "sen_id": 1},
            {"video_id": "video1", "caption": "a dog runs", "sen_id": 2},
            {"video_id": "video2", "caption": "cars race", "sen_id": 3},
        ],
    }
    _write(root / "MSRVTT_data.json", json.dumps(data))
    _write(root / "MSRVTT_train.9k.csv", "video_id\nvideo0\nvideo1\n")
    _write(
        root / "MSRVTT_JSFUSION_test.csv", "key,vid_key,video_id,sentence\nret0,msr7020,video2,cars race on a track\n"
    )
    return root


def test_msrvtt(msrvtt):
    ds = load_dataset(msrvtt)
    assert ds.name == "msrvtt" and detect_format(msrvtt) == "msrvtt"
    assert [v.id for v in ds.split("train")] == ["video0", "video1"]
    assert [v.id for v in ds.split("test")] == ["video2"]
    assert ds.queries == {"video2": ["cars race on a track"]}
    assert "cars race on a track" in ds.sentences_of("video2")  # queries are also sentences
    assert ds.sentences_of("video0") == ["a man cooks", "someone is cooking"]
    assert ds.video_path(ds.by_id["video1"]).is_file()  # found under videos/all/


def test_msrvtt_7k_split_and_file_argument(msrvtt):
    (msrvtt / "MSRVTT_train.9k.csv").rename(msrvtt / "MSRVTT_train.7k.csv")
    ds = load_dataset(msrvtt / "MSRVTT_data.json")
    assert len(ds.split("train")) == 2


def test_didemo(tmp_path, mp4_factory):
    root = tmp_path / "didemo"
    mp4_factory("didemo/videos/a@b_1.mp4")
    train = [
        {"video": "a@b_1.mp4", "description": "a girl waves.", "times": [[0, 0]]},
        {"video": "a@b_1.mp4", "description": "she jumps.", "times": [[1, 2]]},
    ]
    test = [
        {"video": "c@d_2.mov", "description": "a cat sleeps.", "times": [[0, 1]]},
        {"video": "c@d_2.mov", "description": "it wakes up.", "times": [[3, 4]]},
        {"video": "e_3.mp4", "description": "not in the list", "times": [[0, 0]]},
    ]
    _write(root / "train_data.json", json.dumps(train))
    _write(root / "test_data.json", json.dumps(test))
    _write(root / "test_list.txt", "c@d_2.mov\n")
    ds = load_dataset(root)
    assert ds.name == "didemo"
    assert [(v.id, v.split) for v in ds.videos] == [("a@b_1.mp4", "train"), ("c@d_2.mov", "test")]
    assert ds.queries == {"c@d_2.mov": ["a cat sleeps. it wakes up."]}  # paragraph retrieval
    assert ds.video_path(ds.by_id["a@b_1.mp4"]).is_file()
    assert "a girl waves. she jumps." in ds.sentences_of("a@b_1.mp4")


def test_activitynet(tmp_path, mp4_factory):
    root = tmp_path / "anet"
    mp4_factory("anet/videos/abc.mp4")  # downloaded without the "v_" prefix
    item = {"duration": 10.0, "timestamps": [[0, 4], [4, 10]], "sentences": ["A man walks in. ", " He sits down."]}
    _write(root / "train.json", json.dumps({"v_abc": item}))
    _write(root / "val_1.json", json.dumps({"v_xyz": {**item, "sentences": ["Kids play.", "They leave."]}}))
    ds = load_dataset(root)
    assert ds.name == "activitynet"
    assert [(v.id, v.split) for v in ds.videos] == [("v_abc", "train"), ("v_xyz", "test")]
    assert ds.video_path(ds.by_id["v_abc"]).is_file()
    assert ds.queries == {"v_xyz": ["Kids play. They leave."]}
    assert ds.sentences_of("v_abc")[:2] == ["A man walks in.", "He sits down."]


def test_msvd(tmp_path, mp4_factory):
    root = tmp_path / "msvd"
    mp4_factory("msvd/YouTubeClips/-4wsuPCjDBc_5_15.mp4")
    _write(
        root / "AllVideoDescriptions.txt",
        "# MSVD captions\n\n-4wsuPCjDBc_5_15 a squirrel eats\n"
        "-4wsuPCjDBc_5_15 a squirrel is eating a peanut\nzzz_1_2 a man sings\n",
    )
    _write(root / "train_list.txt", "-4wsuPCjDBc_5_15\n")
    _write(root / "test_list.txt", "zzz_1_2\n")
    ds = load_dataset(root)
    assert ds.name == "msvd" and [v.split for v in ds.videos] == ["train", "test"]
    assert ds.sentences_of("-4wsuPCjDBc_5_15") == ["a squirrel eats", "a squirrel is eating a peanut"]
    assert ds.queries_of("zzz_1_2") == ["a man sings"]  # every sentence is a query
    assert ds.video_path(ds.videos[0]).is_file()


@pytest.mark.parametrize(
    "name,text,expect",
    [
        ("MSRVTT_data.json", '{"sentences": [{"video_id": "video0"}]}', "sentences[0]: missing field 'caption'"),
        (
            "MSRVTT_data.json",
            '{"sentences": [{"video_id": "video0", "caption": " "}]}',
            "sentences[0]: expected a non-empty",
        ),
        ("MSRVTT_data.json", '{"videos": []', "not valid JSON"),
        ("MSRVTT_JSFUSION_test.csv", "key,video\nret0,video2\n", "missing column(s) ['video_id', 'sentence']"),
        ("MSRVTT_train.9k.csv", "video_id\nvideo9\n", "video 'video9' has no sentences"),
    ],
)
def test_malformed_msrvtt(msrvtt, name, text, expect):
    (msrvtt / name).write_text(text)
    with pytest.raises(DataError) as info:
        load_dataset(msrvtt)
    assert str(info.value).startswith(str(msrvtt / name)) and expect in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "files,expect",
    [
        ({"train_data.json": '{"video": "a"}'}, "train_data.json: expected a list"),
        ({"train_data.json": '[{"video": "a"}]'}, "entry 0: missing field 'description'"),
        ({"val_1.json": '{"v_a": {"sentences": []}}'}, "video 'v_a': 'sentences' must be a non-empty list"),
        ({"val_1.json": '{"v_a": {"timestamps": [[0, 1]], "sentences": ["x", "y"]}}'}, "1 timestamps for 2 sentences"),
        (
            {"AllVideoDescriptions.txt": "vid_only\n", "train_list.txt": "vid_only\n"},
            "line 1: expected '<video id> <caption>'",
        ),
        ({"AllVideoDescriptions.txt": "a b c\n", "test_list.txt": "zz\n"}, "test_list.txt: video 'zz' has no captions"),
    ],
)
def test_malformed_other_formats(tmp_path, files, expect):
    for name, text in files.items():
        _write(tmp_path / name, text)
    with pytest.raises(DataError, match=None) as info:
        load_dataset(tmp_path)
    assert expect in str(info.value) and str(tmp_path) in str(info.value)


def test_unknown_layout_and_format(tmp_path):
    with pytest.raises(DataError, match="no known annotation file"):
        load_dataset(tmp_path)
    with pytest.raises(DataError, match="unknown data format 'nope'"):
        load_dataset(tmp_path, format="nope")
    with pytest.raises(DataError, match="no such file"):
        load_dataset(tmp_path / "missing")


# ----------------------------------------------------------------------------- CLI


def test_cli_features_on_msrvtt(msrvtt, capsys):
    out = msrvtt / "feats"
    assert main(["features", "--data", str(msrvtt), "--out", str(out), "--num-frames", "2", "--size", "32"]) == 0
    assert f"{out}: 3 videos x 2 frames" in capsys.readouterr().out
    meta = json.loads((out / "features.json").read_text())
    assert meta["video_ids"] == ["video0", "video1", "video2"] and meta["size"] == 32


def test_cli_features_bad_video_and_skip_bad(msrvtt, capsys):
    (msrvtt / "videos/all/video1.mp4").write_text("garbage")
    args = ["features", "--data", str(msrvtt), "--num-frames", "2", "--size", "32"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar's last state
    assert err.startswith("error: ") and "video1.mp4: not a readable video" in err
    assert main(args + ["--skip-bad"]) == 0
    assert "1 skipped" in capsys.readouterr().out
    assert (msrvtt / "features/skipped.jsonl").exists()  # default out: DATA/features


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["features", "--data", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert main(["features", "--data", str(tmp_path), "--size", "8"]) == 2
    assert "size" in capsys.readouterr().err
    assert main(["data", "info", "--data", str(tmp_path / "nope")]) == 2


def test_cli_data_info(msrvtt, capsys):
    assert main(["data", "info", "--data", str(msrvtt)]) == 0
    out = capsys.readouterr().out
    assert "msrvtt train: 2 videos, 3 sentences, 0 queries" in out
    assert "msrvtt test: 1 videos, 2 sentences, 1 queries" in out
