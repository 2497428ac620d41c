"""Twin groups in one place: `Dataset.units`, `group_key`, `has_twin_groups` and `work_units`, and
the stages that batch by them (retriever, preferences, DPO) agreeing on one rule for lone videos."""

from __future__ import annotations

from caredpo.records import Dataset, Sentence, Video, work_units


def _ds(groups):
    videos = [Video(f"v{i}", f"v{i}.mp4", "train", g) for i, g in enumerate(groups)]
    return Dataset("/tmp", videos, [Sentence(v.id, f"a sentence of {v.id}") for v in videos])


def test_units_are_whole_groups_in_first_seen_order_and_lone_videos_alone():
    ds = _ds(["g1", None, "g0", "g1", None, "g0"])
    ids = [v.id for v in ds.videos]
    assert ds.units(ids) == [["v0", "v3"], ["v1"], ["v2", "v5"], ["v4"]]
    assert [ds.group_key(v) for v in ids] == ["g1", "v1", "g0", "g1", "v4", "g0"]
    assert not ds.has_twin_groups(ids) and ds.has_twin_groups(["v0", "v2"])


def test_a_lone_video_never_merges_with_a_group_of_its_name():
    rows = [{"video_id": "g0", "group": None}, {"video_id": "a", "group": "g0"}, {"video_id": "b", "group": "g0"}]
    assert work_units(rows, lambda r: r["group"]) == [[rows[0]], [rows[1], rows[2]]]


def test_retriever_prefs_and_dpo_share_the_lone_video_rule():
    """On data without groups every stage works per video; the retriever keeps its batch size in
    videos (4 lone videos for each twin group it would take)."""
    from caredpo.dpo.train import twin_batches
    from caredpo.retrieval.train import epoch_batches, units_per_batch

    ds = _ds([None] * 10)
    ids = [v.id for v in ds.videos]
    assert ds.units(ids) == [[v] for v in ids]
    per = units_per_batch(ds, ids, 2)
    assert per == 8 and [len(b) for b in epoch_batches(ds.units(ids), per, 0, 0)] == [8, 2]
    rows = [{"video_id": v, "group": None} for v in ids]
    assert sorted(len(b) for b in twin_batches(rows, 3, 0, 0)) == [1, 3, 3, 3]
    grouped = _ds([f"g{i // 4}" for i in range(8)])
    gids = [v.id for v in grouped.videos]
    assert units_per_batch(grouped, gids, 2) == 2
    assert all(sorted(b) in (gids[:4], gids[4:]) for b in epoch_batches(grouped.units(gids), 1, 0, 0))
