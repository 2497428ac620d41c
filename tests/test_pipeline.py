"""`caredpo run --preset smoke` end to end: the results file's structure and ranges, the outputs a
person reads, and that a second run reuses every finished stage."""

from __future__ import annotations

import json
import math
import re
import shlex
from pathlib import Path

import pytest

from caredpo.cli import main
from caredpo.dpo.train import read_stats
from caredpo.pipeline.layout import RunLayout, TrainerFiles
from caredpo.pipeline.presets import CAPTION_ARMS, RERANKERS, RETRIEVERS
from caredpo.pipeline.report import ARM_RERANKERS, ARM_RETRIEVERS
from caredpo.pipeline.stages import STAGES
from caredpo.records import DataError


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "smoke"
    assert main(["run", "--preset", "smoke", "--seed", "0", "--out", str(out)]) == 0
    return out


def _check_metrics(m: dict) -> None:
    for direction in ("t2v", "v2t"):
        d = m[direction]
        for k in ("R1", "R5", "R10"):
            assert 0.0 <= d[k] <= 100.0 and math.isfinite(d[k])
        assert d["R1"] <= d["R5"] <= d["R10"]
        assert 1.0 <= d["MdR"] <= m["n_videos"] and 1.0 <= d["MnR"] <= m["n_videos"]
    assert 0.0 <= m["twin_acc"] <= 100.0


def test_results_structure_and_ranges(smoke_run):
    results = json.loads((smoke_run / "results.json").read_text())
    assert set(results["arms"]) == set(CAPTION_ARMS)
    for arm, by_retriever in results["arms"].items():
        assert set(by_retriever) == set(ARM_RETRIEVERS[arm]) | set(ARM_RERANKERS[arm])  # smoke has rerankers
        for m in by_retriever.values():
            _check_metrics(m)
            assert m["n_videos"] == 12 and m["n_queries"] == 12  # 3 test twin groups, one query each
    assert results["arms"]["no_caption"]["no_caption"]["captioned"] == 0
    assert results["arms"]["reference"]["role"]["caption_equals_query"] == 0  # the oracle never leaks
    meta = results["meta"]
    assert meta["preset"] == "smoke" and meta["seed"] == 0
    assert set(meta["stage_seconds"]) == set(STAGES) and meta["peak_rss_mb"] > 0
    factors = results["caption_factors"]  # TwinClips clips carry factors: every captioned arm is judged
    assert set(factors) == {"sft", "dpo", "dg_dpo", "reference"}
    for scores in factors.values():
        assert scores["n"] == 12 and all(0.0 <= scores[f] <= 100.0 for f in ("colour", "shape", "direction"))
    # reference sentences come from the grammar: the first colour/shape word is the clip's own
    assert factors["reference"]["colour"] == factors["reference"]["shape"] == 100.0


def test_outputs_for_people(smoke_run):
    for name in ("r1_per_arm.png", "dpo_curves.png"):
        assert (smoke_run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (smoke_run / "captions.md").read_text()
    assert "factors:" in md and "- dg_dpo:" in md and "- reference:" in md
    assert f"stage {len(STAGES)}/{len(STAGES)} evaluate: finished" in (smoke_run / "run.log").read_text()


def test_trainer_folders_hold_the_files_the_layout_names(smoke_run):
    """Every trainer of the run (SFT, both DPO arms, each retriever) wrote the files `RunLayout`
    names for it (`caredpo.training`'s names), and the DPO log is what the curves plot reads."""
    layout = RunLayout.load(smoke_run)
    folders = [layout.captioner_files(arm) for arm in ("sft", "dpo", "dg_dpo")]
    folders += [layout.retriever_files(name) for name in RETRIEVERS]
    folders += [TrainerFiles(layout.reranker(name)) for name in RERANKERS]
    for files in folders:
        assert files.finished and files.log.exists() and files.config.exists(), files.root
        assert (files.checkpoint / "state.json").exists(), files.root
    for arm in ("dpo", "dg_dpo"):
        steps = [step for step, _ in read_stats(layout.captioner(arm))]
        assert steps and steps == sorted(steps)


def test_second_run_reuses_every_stage(smoke_run, capsys):
    markers = {p: p.stat().st_mtime_ns for p in (smoke_run / "stages").glob("*.json")}
    assert main(["run", "--preset", "smoke", "--seed", "0", "--out", str(smoke_run)]) == 0
    assert {p: p.stat().st_mtime_ns for p in markers} == markers
    assert "no_caption" in capsys.readouterr().out  # the table is printed again


def test_other_config_in_same_folder_is_refused(smoke_run, capsys):
    assert main(["run", "--preset", "smoke", "--seed", "1", "--out", str(smoke_run)]) == 2
    assert "another preset/seed/config" in capsys.readouterr().err


def test_eval_run_on_user_queries(smoke_run, tmp_path):
    annotations = json.loads((smoke_run / "data" / "annotations.json").read_text())
    test_ids = [v["video_id"] for v in annotations["videos"] if v["split"] == "test"]
    queries = tmp_path / "q.json"
    queries.write_text(json.dumps({v: ["a shape moves over the ground", "something changes"] for v in test_ids[:6]}))
    out = tmp_path / "custom.json"
    assert main(["eval", "--run", str(smoke_run), "--queries", str(queries), "--out", str(out)]) == 0
    arms = json.loads(out.read_text())["arms"]
    assert set(arms) == set(CAPTION_ARMS)
    for by_retriever in arms.values():
        for m in by_retriever.values():
            _check_metrics(m)
            assert m["n_queries"] == 12 and m["n_videos"] == 12  # 6 videos x 2 queries; all 12 compete


def test_eval_with_a_reranker_gives_the_runs_reranked_row(smoke_run, tmp_path, capsys):
    """`caredpo eval --model --data --captions --reranker` = the run's two-stage row of that arm."""
    from caredpo.pipeline.presets import RERANKERS

    layout = RunLayout.load(smoke_run)
    first_stage = RERANKERS["rerank_role"][1]
    out = tmp_path / "two_stage.json"
    args = ["eval", "--model", str(layout.retriever(first_stage) / "model"), "--data", str(smoke_run / "data")]
    args += ["--captions", str(layout.captions("dg_dpo", "test")), "--reranker", str(layout.reranker("rerank_role"))]
    assert main([*args, "--k", "8", "--out", str(out)]) == 0
    got = json.loads(out.read_text())["reranked"]
    want = json.loads((smoke_run / "results.json").read_text())["arms"]["dg_dpo"]["rerank_role"]
    assert got["k"] == want["k"] == 8 and got["pairs_scored"] == want["pairs_scored"]
    for d in ("t2v", "v2t"):
        assert got[d] == pytest.approx(want[d])
    assert got["twin_acc"] == pytest.approx(want["twin_acc"])
    assert "reranking top 8" in capsys.readouterr().out


def test_aggregate_over_seeds_by_hand():
    from caredpo.pipeline.report import aggregate

    def arms(r1, twin):
        m = {"t2v": {"R1": r1, "R5": 50.0, "MnR": 3.0}, "v2t": {"R1": 10.0}, "twin_acc": twin}
        return {"sft": {"role": m}}

    out = aggregate([arms(10.0, 20.0), arms(20.0, 30.0), arms(30.0, 25.0)])
    assert out["sft"]["role"]["t2v R@1"] == pytest.approx((20.0, 10.0))  # mean 20, sample std 10
    assert out["sft"]["role"]["twin acc %"] == pytest.approx((25.0, 5.0))
    assert out["sft"]["role"]["t2v R@5"] == (50.0, 0.0)


def test_summary_command_prints_mean_and_spread(smoke_run, capsys):
    assert main(["summary", str(smoke_run), str(smoke_run)]) == 0
    out = capsys.readouterr().out
    assert "mean ± std over 2 run(s)" in out and "± 0.0" in out


def readme_stage_commands(overrides: dict[str, str]) -> list[list[str]]:
    """The commands of the README's stage-by-stage block, as argv lists for `main`: its shell
    variables expanded (`overrides` replace the values the README assigns), `caredpo` dropped."""
    text = (Path(__file__).parents[1] / "README.md").read_text()
    block = text.split("## The pipeline, stage by stage", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    env: dict[str, str] = {}

    def expand(s: str) -> str:
        return re.sub(r"\$(\w+)", lambda m: env[m.group(1)], s)

    commands = []
    for line in block.splitlines():
        if line.startswith("caredpo "):
            commands.append(shlex.split(expand(line))[1:])
            continue
        for assignment in filter(None, (a.strip() for a in line.split(";"))):
            name, _, value = assignment.partition("=")
            env[name] = overrides.get(name) or shlex.split(expand(value))[0]
    return commands


def test_readme_stage_commands_reproduce_caredpo_run(smoke_run, tmp_path):
    """The README's stage commands, in order, on the smoke preset end with the metrics of
    `caredpo run --preset smoke`: each stage is one function, and the commands start from the
    preset as the pipeline does."""
    run = tmp_path / "stages"
    commands = readme_stage_commands({"P": "--preset smoke --seed 0", "RUN": str(run)})
    assert [c[0] for c in commands[:2]] == ["data", "features"] and commands[-1][:2] == ["eval", "--run"]
    for argv in commands:
        assert main(argv) == 0, argv
    want, got = (json.loads((r / "results.json").read_text()) for r in (smoke_run, run))
    assert got["arms"] == want["arms"]
    assert got["caption_factors"] == want["caption_factors"]


def _run_worker(rank: int, port: int, out: str) -> None:
    """One process of `torchrun --nproc_per_node=2 caredpo run --preset smoke` (gloo, 1 thread)."""
    import os

    import torch

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    assert main(["run", "--preset", "smoke", "--seed", "0", "--out", out]) == 0


def test_two_processes_run_every_stage_once(smoke_run, tmp_path):
    """`caredpo run` under torchrun: each stage once, the DPO arms side by side on the two processes,
    rank 0's stages on rank 0, a results file with every row of the one-process run. This checks the
    plumbing; `test_distributed` checks that the data-parallel maths equals one process's."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "two"
    mp.spawn(_run_worker, args=(port, str(out)), nprocs=2, join=True)
    markers = {p.stem: json.loads(p.read_text()) for p in (out / "stages").glob("*.json")}
    assert set(markers) == set(STAGES)
    assert {markers["dpo"]["process"], markers["dg_dpo"]["process"]} == {0, 1}  # side by side
    assert markers["evaluate"]["process"] == markers["features"]["process"] == 0  # rank 0's stages
    assert "2 processes" in (out / "run.log").read_text().splitlines()[0]
    want, got = (json.loads((r / "results.json").read_text()) for r in (smoke_run, out))
    assert got["arms"].keys() == want["arms"].keys()
    for arm, rows in got["arms"].items():
        assert rows.keys() == want["arms"][arm].keys()
        for m in rows.values():
            _check_metrics(m)
    for name in RETRIEVERS:  # each retriever trained whole in one process
        assert TrainerFiles(out / "retriever" / name).finished


def test_prefs_stage_with_the_reranker_as_reward(smoke_run, tmp_path):
    """reward_model "reranker": the stage's rows carry the reranker's rewards (not the retriever's)."""
    from dataclasses import replace

    from caredpo.captioner.model import VideoCaptioner
    from caredpo.data import load_dataset
    from caredpo.features import FeatureStore
    from caredpo.io import read_jsonl
    from caredpo.pipeline.presets import run_config
    from caredpo.pipeline.stages import REWARD_RERANKER, build_prefs

    layout = RunLayout.load(smoke_run)
    ds, store = load_dataset(layout.data), FeatureStore.load(layout.features)
    cfg = replace(run_config("smoke").prefs, reward_model="reranker")
    sft = VideoCaptioner.from_pretrained(layout.captioner_model("sft")).eval()
    args = (sft, layout.retriever("role"), ds, store, tmp_path / "rr", layout.captions("sft", "train"), cfg)
    summary = build_prefs(*args, reranker=layout.reranker(REWARD_RERANKER))
    got = {r["video_id"]: r for r in read_jsonl(tmp_path / "rr" / "groups.jsonl")}
    want = {r["video_id"]: r for r in read_jsonl(layout.groups)}
    assert summary["videos"] == len(want) and set(got) == set(want)
    assert all(got[v]["captions"] == want[v]["captions"] for v in want)  # the same samples ...
    assert any(got[v]["rewards"] != want[v]["rewards"] for v in want)  # ... rewarded by another model
    with pytest.raises(DataError, match="trained reranker"):
        build_prefs(*args[:4], tmp_path / "none", *args[5:])
