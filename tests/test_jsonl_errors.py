"""A malformed line of a JSONL input fails with one line: the file, the line number and the reason.

Readers: `io.read_jsonl` itself, captions (`load_captions`, `done_ids`),
preference groups (`load_groups`), the shards `merge_parts` folds, and the --queries JSON file.
"""

from __future__ import annotations

import json

import pytest

from caredpo.captioner.generate import done_ids, load_captions
from caredpo.dpo.train import load_groups
from caredpo.io import merge_parts, part_path, read_jsonl
from caredpo.records import DataError
from caredpo.retrieval.score import read_queries

CAPTION = {"video_id": "v1", "captions": ["a red circle"], "sampling": {"n": 1}}
GROUP = {
    "video_id": "v1",
    "group": "g1",
    "captions": ["a", "b"],
    "rewards": [0.9, 0.1],
    "ref_logps": [-1.0, -2.0],
    "best": 0,
    "negatives": ["v2"],
    "ref_cross_logps": [-3.0],
}


def _write(path, *lines: str):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _one_line(info) -> str:
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


# ---------------------------------------------------------------- io.read_jsonl


def test_bad_json_names_file_line_and_reason(tmp_path):
    path = _write(tmp_path / "captions.jsonl", json.dumps(CAPTION), '{"video_id": "v2" "captions": []}')
    with pytest.raises(DataError) as info:
        list(read_jsonl(path))
    assert _one_line(info).startswith(f"{path}:2: not valid JSON (Expecting ',' delimiter at column 19)")


def test_a_line_that_is_not_an_object(tmp_path):
    path = _write(tmp_path / "x.jsonl", "[1, 2]")
    with pytest.raises(DataError, match=r"x\.jsonl:1: expected a JSON object, got a list"):
        list(read_jsonl(path))


def test_fields_missing_or_of_the_wrong_type(tmp_path):
    path = _write(tmp_path / "x.jsonl", json.dumps({"video_id": "v1"}))
    with pytest.raises(DataError, match=r'x\.jsonl:1: missing field "captions"'):
        list(read_jsonl(path, {"video_id": str, "captions": list}))
    _write(path, json.dumps({"video_id": "v1", "captions": "a red circle"}))
    with pytest.raises(DataError, match=r'x\.jsonl:1: field "captions" must be a list, got a string'):
        list(read_jsonl(path, {"video_id": str, "captions": list}))
    _write(path, json.dumps({"best": True}))
    with pytest.raises(DataError, match=r'field "best" must be an integer, got true/false'):
        list(read_jsonl(path, {"best": int}))


def test_blank_lines_skipped_torn_tail_ignored_line_numbers_kept(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(CAPTION) + "\n\n" + "{oops\n" + '{"video_id": "torn')
    with pytest.raises(DataError, match=r"x\.jsonl:3: not valid JSON"):  # line 3, counting the blank one
        list(read_jsonl(path))
    path.write_text(json.dumps(CAPTION) + "\n   \n" + '{"video_id": "torn')
    assert list(read_jsonl(path)) == [CAPTION]
    assert list(read_jsonl(tmp_path / "missing.jsonl")) == []  # a log not started yet


# ---------------------------------------------------------------- captions


def test_captions_readers(tmp_path):
    path = _write(tmp_path / "captions.jsonl", json.dumps(CAPTION), json.dumps({"video_id": "v2"}))
    for read in (load_captions, lambda p: done_ids(p, {"n": 1})):
        with pytest.raises(DataError) as info:
            read(path)
        assert _one_line(info) == f'{path}:2: missing field "captions"'
    _write(path, json.dumps(CAPTION), "{not json")
    for read in (load_captions, lambda p: done_ids(p, {"n": 1})):
        with pytest.raises(DataError, match=r"captions\.jsonl:2: not valid JSON"):
            read(path)


def test_captions_must_be_strings_and_the_file_must_exist(tmp_path):
    path = _write(tmp_path / "captions.jsonl", json.dumps(CAPTION), json.dumps({**CAPTION, "captions": ["a", 3]}))
    with pytest.raises(DataError) as info:
        load_captions(path)
    assert _one_line(info) == f'{path}:2: field "captions" must be a list of strings'
    with pytest.raises(DataError, match="captions file not found"):
        load_captions(tmp_path / "missing.jsonl")


def test_captions_written_with_other_settings_name_the_line(tmp_path):
    path = _write(tmp_path / "captions.jsonl", json.dumps(CAPTION), json.dumps({**CAPTION, "sampling": {"n": 2}}))
    with pytest.raises(DataError, match=r"captions\.jsonl:2: written with other sampling settings"):
        done_ids(path, {"n": 1})


# ---------------------------------------------------------------- preference groups


@pytest.mark.parametrize(
    "line, reason",
    [
        ('{"video_id": "v1", "captions": ["a"]', "not valid JSON (Expecting ',' delimiter"),
        (json.dumps({k: v for k, v in GROUP.items() if k != "ref_logps"}), 'missing field "ref_logps"'),
        (json.dumps({**GROUP, "captions": "a"}), 'field "captions" must be a list, got a string'),
        (json.dumps({**GROUP, "rewards": [0.9, "high"]}), "v1: rewards and reference log-probs must be numbers"),
        (json.dumps({**GROUP, "negatives": "v2"}), "v1: negatives, ref_cross_logps and lengths must be lists"),
        (json.dumps({**GROUP, "best": 1}), "v1: best=1 is not an index of a top-reward caption"),
    ],
)
def test_groups_reader(tmp_path, line, reason):
    path = _write(tmp_path / "groups.jsonl", json.dumps(GROUP), line)
    with pytest.raises(DataError) as info:
        load_groups(path)
    assert _one_line(info).startswith(f"{path}:2: {reason}")


def test_groups_reader_accepts_good_rows(tmp_path):
    path = _write(tmp_path / "groups.jsonl", json.dumps(GROUP), "", json.dumps({**GROUP, "video_id": "v2"}))
    assert [r["video_id"] for r in load_groups(path)] == ["v1", "v2"]
    with pytest.raises(DataError, match="no preference groups"):
        load_groups(_write(tmp_path / "empty.jsonl"))


# ---------------------------------------------------------------- shards, queries


def test_merge_names_the_bad_part(tmp_path):
    out = tmp_path / "groups.jsonl"
    _write(part_path(out, 0), json.dumps(GROUP))
    _write(part_path(out, 1), json.dumps({"group": "g2"}))
    with pytest.raises(DataError, match=r'groups\.jsonl\.part1:1: missing field "video_id"'):
        merge_parts(out, ["v1"])


def test_queries_file(tmp_path):
    path = tmp_path / "q.json"
    path.write_text('{"v1": ["a red circle"],\n "v2": ["a blue square"] "v3": []}')
    with pytest.raises(DataError) as info:
        read_queries(path)
    assert _one_line(info).startswith(f"{path}:2: not valid JSON (Expecting ',' delimiter")
    path.write_text(json.dumps({"v1": ["a red circle"], "v2": 7}))
    with pytest.raises(DataError, match=r"q\.json: video 'v2': expected a sentence or a list of sentences"):
        read_queries(path)
    path.write_text(json.dumps({"v1": "a red circle", "v2": ["a blue square", "a square"]}))
    assert read_queries(path) == {"v1": ["a red circle"], "v2": ["a blue square", "a square"]}
