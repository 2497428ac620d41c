"""The trl export of the preference stage: a `datasets` folder with trl's columns, pairs picked by
the loss's own rule, and one real step of trl's DPOTrainer on two exported rows."""

from __future__ import annotations

import json
import math

import pytest

from caredpo.cli import main
from caredpo.dpo.export import PAIR_COLUMNS, export_pairs, pair_indices
from caredpo.records import DataError, Dataset, Sentence, Video

CAPS = ["a red circle slides to the right", "a red circle moves", "a red circle slides to the left", "a blue square"]


def _dataset(root) -> Dataset:
    videos = [Video(f"v{i}", f"videos/v{i}.mp4", "train", group="g0") for i in range(2)]
    return Dataset(root, videos, [Sentence(v.id, "a red circle") for v in videos])


def _groups(path, rewards=((0.9, 0.5, 0.1, 0.5), (0.2, 0.8, 0.8, 0.4))):
    rows = [
        {
            "video_id": f"v{i}",
            "group": "g0",
            "captions": CAPS,
            "rewards": list(r),
            "ref_logps": [-10.0 - j for j in range(4)],
            "best": max(range(4), key=lambda j: r[j]),
            "negatives": [f"v{1 - i}"],
            "ref_cross_logps": [-20.0],
        }
        for i, r in enumerate(rewards)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_pairs_follow_the_loss_rule():
    assert pair_indices([0.9, 0.5, 0.1, 0.5]) == [(0, 1), (0, 2), (0, 3), (1, 2), (3, 2)]  # ties: no pair
    assert pair_indices([0.9, 0.5, 0.1, 0.5], margin=0.5) == [(0, 2)]
    assert pair_indices([0.2, 0.8, 0.8, 0.4], pairs="best_worst") == [(1, 0)]  # first index wins a tie


def test_export_loads_with_trl_columns(tmp_path):
    from datasets import load_from_disk

    ds = _dataset(tmp_path / "data")
    out = export_pairs(_groups(tmp_path / "groups.jsonl"), ds, tmp_path / "trl")
    pairs = load_from_disk(str(out))
    assert set(PAIR_COLUMNS) <= set(pairs.column_names)
    assert {
        "video_id",
        "video_path",
        "group",
        "chosen_reward",
        "rejected_reward",
        "chosen_ref_logp",
        "rejected_ref_logp",
    } <= set(pairs.column_names)
    assert len(pairs) == 5 + 5  # 6 pairs of 4 captions a video, less the one tie of each
    first = pairs[0]
    assert first["prompt"] == "Describe the video in one sentence.\n"
    assert (first["chosen"], first["rejected"]) == (CAPS[0], CAPS[1])
    assert first["video_path"] == str(tmp_path / "data" / "videos" / "v0.mp4") and first["group"] == "g0"
    assert (first["chosen_ref_logp"], first["rejected_ref_logp"]) == (-10.0, -11.0)
    assert all(r["chosen_reward"] > r["rejected_reward"] for r in pairs)
    again = export_pairs(tmp_path / "groups.jsonl", ds, out, "Caption it.", pairs="best_worst")
    assert load_from_disk(str(again))["prompt"] == ["Caption it.\n"] * 2  # replaced, one pair a video


def test_conversational_and_refusals(tmp_path):
    from datasets import load_from_disk

    ds = _dataset(tmp_path / "data")
    out = export_pairs(_groups(tmp_path / "groups.jsonl"), ds, tmp_path / "trl", conversational=True)
    row = load_from_disk(str(out))[0]
    assert row["prompt"] == [{"role": "user", "content": "Describe the video in one sentence."}]
    assert row["chosen"] == [{"role": "assistant", "content": CAPS[0]}]
    tied = _groups(tmp_path / "tied.jsonl", rewards=((0.5,) * 4, (0.5,) * 4))
    with pytest.raises(DataError, match="no preference pairs"):
        export_pairs(tied, ds, tmp_path / "none")
    assert not (tmp_path / "none").exists()


def test_export_trl_command(tmp_path, capsys):
    root = tmp_path / "msvd"  # a data set in MSVD's layout; the export needs no video file
    root.mkdir()
    (root / "AllVideoDescriptions.txt").write_text("v0 a red circle\nv1 a red circle\n")
    (root / "train_list.txt").write_text("v0\nv1\n")
    groups = _groups(tmp_path / "groups.jsonl")
    assert (
        main(
            [
                "export-trl",
                "--groups",
                str(groups),
                "--data",
                str(root),
                "--out",
                str(tmp_path / "trl"),
                "--pairs",
                "best_worst",
            ]
        )
        == 0
    )
    assert "trl pairs:" in capsys.readouterr().out
    assert (
        main(
            [
                "export-trl",
                "--groups",
                str(groups),
                "--data",
                str(root),
                "--out",
                str(tmp_path / "x"),
                "--pairs",
                "some",
            ]
        )
        == 2
    )
    (tmp_path / "bad.jsonl").write_text('{"video_id": "v0"\n')
    assert (
        main(["export-trl", "--groups", str(tmp_path / "bad.jsonl"), "--data", str(root), "--out", str(tmp_path / "y")])
        == 2
    )
    assert "bad.jsonl:1: not valid JSON" in capsys.readouterr().err


def test_one_trl_dpo_step_on_two_exported_rows(tmp_path):
    """trl 1.16's DPOTrainer reads the export as it is: a tiny Llama from a config, no download."""
    from datasets import load_from_disk
    from trl import DPOConfig, DPOTrainer

    from caredpo.captioner.lm import build_tiny_lm, build_tiny_tokenizer

    out = export_pairs(_groups(tmp_path / "groups.jsonl"), _dataset(tmp_path / "data"), tmp_path / "trl")
    pairs = load_from_disk(str(out)).select(range(2))
    tok = build_tiny_tokenizer()
    args = DPOConfig(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=2,
        max_steps=1,
        learning_rate=1e-3,
        beta=0.1,
        max_length=None,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    # the reference: a second copy with the same seed (trl would rebuild one from config.architectures)
    trainer = DPOTrainer(
        model=build_tiny_lm(tok), ref_model=build_tiny_lm(tok), args=args, train_dataset=pairs, processing_class=tok
    )
    trainer.train()
    assert trainer.state.global_step == 1
    logged = next(r for r in trainer.state.log_history if "loss" in r)
    assert math.isfinite(logged["loss"])
    assert logged["loss"] == pytest.approx(math.log(2), abs=1e-3)  # policy = reference at step 0


def test_prefs_command_exports(tmp_path, capsys):
    """`caredpo prefs --export-trl` end to end on tiny saved models and 4 real mp4 clips (MSVD layout,
    no twin groups: the hard negatives are embedding neighbours)."""
    from datasets import load_from_disk

    from caredpo.captioner.model import CaptionerConfig, VideoCaptioner
    from caredpo.retrieval.model import Retriever, RetrieverConfig
    from conftest import write_mp4

    data = tmp_path / "msvd"
    ids = [f"clip{i}" for i in range(4)]
    for i, v in enumerate(ids):
        write_mp4(data / "videos" / f"{v}.mp4", num_frames=4, size=32, seed=i)
    (data / "AllVideoDescriptions.txt").write_text("".join(f"{v} a red square moves right\n" for v in ids))
    (data / "train_list.txt").write_text("\n".join(ids) + "\n")
    assert main(["features", "--data", str(data), "--num-frames", "2", "--size", "32"]) == 0
    VideoCaptioner(
        CaptionerConfig(lm="tiny", num_frames=2, colour_bins=64, projector_hidden=32, lora_layers=1, lora_rank=4)
    ).save_pretrained(tmp_path / "sft")
    Retriever(RetrieverConfig(text_encoder="tiny", num_frames=2)).save_pretrained(tmp_path / "retriever")
    greedy = tmp_path / "train_captions.jsonl"
    greedy.write_text("".join(json.dumps({"video_id": v, "captions": ["a red square"]}) + "\n" for v in ids))
    assert (
        main(
            [
                "prefs",
                "--data",
                str(data),
                "--captioner",
                str(tmp_path / "sft"),
                "--retriever",
                str(tmp_path / "retriever"),
                "--train-captions",
                str(greedy),
                "--out",
                str(tmp_path / "prefs"),
                "--num-samples",
                "3",
                "--export-trl",
                str(tmp_path / "trl"),
            ]
        )
        == 0
    )
    assert "trl pairs:" in capsys.readouterr().out
    pairs = load_from_disk(str(tmp_path / "trl"))
    assert set(PAIR_COLUMNS) <= set(pairs.column_names) and set(pairs["video_id"]) <= set(ids)
    assert all(r["chosen_reward"] > r["rejected_reward"] for r in pairs)
