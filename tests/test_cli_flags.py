"""Options generated from the config dataclasses: names, help from the field comments, nested
fields, None = the preset's value, and one-line errors for rejected values."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from caredpo.cli.flags import NO_OVERRIDES, Overrides, config_flags, field_comments
from caredpo.records import DataError


@dataclass(frozen=True)
class Inner:
    pooling: str = "mean"  # how frames become tokens


@dataclass(frozen=True)
class Outer:
    inner: Inner = field(default_factory=Inner)
    # the learning rate,
    # over two lines
    lr: float = 1e-3
    steps: int = 10  # optimizer steps
    dropout: bool = True  # dropout while training
    n: int = field(default=1, metadata={"help": "items", "flags": ("--num-items",)})
    tags: tuple[str, ...] = ()  # not a scalar: no option
    seed: int = 0  # set by --seed

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError("steps must be >= 1")


def _app(seen: list):
    app = typer.Typer()

    @app.command()
    @config_flags(outer=Outer)
    def cmd(out: Path = typer.Option(..., "--out"), overrides: Overrides = NO_OVERRIDES) -> None:
        seen.append(overrides.apply("outer", Outer(steps=5)))

    app.command("noop")(lambda: None)
    return app


def test_comments_trailing_and_above():
    assert field_comments(Outer) == {
        "inner": "",
        "lr": "the learning rate, over two lines",
        "steps": "optimizer steps",
        "dropout": "dropout while training",
        "n": "",
        "tags": "not a scalar: no option",
        "seed": "set by --seed",
    }


def test_options_replace_fields_and_unset_ones_keep_the_base():
    seen: list = []
    app = _app(seen)
    res = CliRunner().invoke(app, ["cmd", "--out", "x"])
    assert res.exit_code == 0, res.output
    assert seen[-1] == Outer(steps=5)  # nothing given: the base config (the preset's) as it is
    res = CliRunner().invoke(
        app, ["cmd", "--out", "x", "--lr", "0.5", "--pooling", "sequence", "--no-dropout", "--num-items", "3"]
    )
    assert res.exit_code == 0, res.output
    assert seen[-1] == Outer(inner=Inner("sequence"), lr=0.5, steps=5, dropout=False, n=3)


def test_help_comes_from_the_fields_and_some_fields_have_no_option():
    res = CliRunner().invoke(_app([]), ["cmd", "--help"], env={"COLUMNS": "200"})
    assert "optimizer steps" in res.output and "the learning rate, over two lines" in res.output
    assert "--tags" not in res.output and "--seed" not in res.output


def test_a_rejected_value_is_a_data_error():
    with pytest.raises(DataError, match="bad option: steps must be >= 1"):
        Overrides({"outer": {("steps",): 0}}).apply("outer", Outer())


def test_a_flag_taken_twice_is_refused_when_the_command_is_built():
    with pytest.raises(TypeError, match="--lr"):

        @config_flags(outer=Outer)
        def cmd(lr: float = typer.Option(1.0, "--lr"), overrides: Overrides = NO_OVERRIDES) -> None: ...


def test_stage_commands_offer_their_config_fields(capsys):
    from caredpo.cli import main

    for argv, names in (
        (["dpo"], ("--lambda-video", "--groups-per-batch", "--preset", "--seed")),
        (["prefs"], ("--num-samples", "--reward", "--max-videos")),
        (["retriever", "train"], ("--video-pooling", "--batch-groups", "--variant")),
        (["captioner", "generate"], ("--max-new-tokens", "--num-captions")),
        (["captioner", "sft"], ("--lora-rank", "--align-steps")),
        (["features"], ("--num-frames", "--skip-bad")),
    ):
        assert main([*argv, "--help"]) == 0
        out = capsys.readouterr().out
        assert all(n in out for n in names), (argv, [n for n in names if n not in out])
    assert main(["dpo", "--groups", "g", "--captioner", "c", "--out", "o", "--mode", "dpo", "--lambda-video", "1"]) == 2
    assert "bad option" in capsys.readouterr().err  # plain DPO has no video group
