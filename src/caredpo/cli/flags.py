"""Command-line options generated from the frozen config dataclasses (trl's dataclass-to-CLI idea).

A stage command names its config sections; every field of each becomes an option `--field-name`
(nested dataclass fields too: `RetrieverTrainConfig.model.video_pooling` -> `--video-pooling`).
Its help is the field's `metadata["help"]`, else its comment in the class source (trailing, or
the comment lines right above it); `metadata["flags"]` adds other names. Every option defaults to
None, "keep the preset's value", so a command starts from `run_config(--preset, --seed)` exactly as
`caredpo run` does and the given options replace fields. `seed` fields are left out: `--seed`
sets them all. Field types other than int, float, str, bool (and their `| None`) are left out.

    @config_flags(sft=SFTConfig)
    def sft(data: Path = typer.Option(...), overrides: Overrides = NO_OVERRIDES) -> None:
        cfg = overrides.apply("sft", run_config(preset, seed).sft)
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import re
import textwrap
import tokenize
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Optional

import typer

from ..records import DataError

SCALARS = (bool, int, float, str)
ALWAYS_EXCLUDED = frozenset({"seed"})  # set by the command's --seed


@dataclass(frozen=True)
class Flag:
    section: str  # the command's name for the config it overrides
    path: tuple[str, ...]  # field names from the section's config down to the scalar
    type: type  # one of SCALARS
    help: str
    names: tuple[str, ...]  # "--field-name", then metadata["flags"]

    @property
    def param(self) -> str:
        """The Python parameter name typer passes the value under (unique per command)."""
        return "cfg__" + "__".join((self.section, *self.path))


class Overrides:
    """Given option values: section -> {field path: value}."""

    def __init__(self, values: Mapping[str, Mapping[tuple[str, ...], Any]] | None = None):
        self.values = {k: dict(v) for k, v in (values or {}).items()}

    def given(self, section: str) -> dict[tuple[str, ...], Any]:
        return dict(self.values.get(section, {}))

    def apply(self, section: str, config: Any) -> Any:
        """`config` with the given fields replaced; a rejected value is one line (DataError)."""
        try:
            return _replace_paths(config, self.given(section))
        except ValueError as e:
            raise DataError(f"bad option: {e}") from None


NO_OVERRIDES = Overrides()


def _replace_paths(config: Any, values: Mapping[tuple[str, ...], Any]) -> Any:
    top: dict[str, Any] = {}
    nested: dict[str, dict[tuple[str, ...], Any]] = {}
    for path, value in values.items():
        if len(path) == 1:
            top[path[0]] = value
        else:
            nested.setdefault(path[0], {})[path[1:]] = value
    for name, sub in nested.items():
        top[name] = _replace_paths(getattr(config, name), sub)
    return dataclasses.replace(config, **top) if top else config


def field_comments(cls: type) -> dict[str, str]:
    """field name -> its comment in the class source: trailing, else the comment block above."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments: dict[int, str] = {}
    code: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            code.add(tok.start[0])
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, str] = {}
    for n, line in enumerate(src.splitlines(), 1):
        m = re.match(r"\s+(\w+)\s*:", line)
        if not m or m.group(1) not in names or m.group(1) in out or n not in code:
            continue
        above = []
        k = n - 1
        while k in comments and k not in code:
            above.insert(0, comments[k])
            k -= 1
        out[m.group(1)] = comments.get(n) or " ".join(above)
    return out


def _scalar(tp: Any) -> type | None:
    """int / float / str / bool, also inside `X | None`; None for any other type."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _scalar(args[0]) if len(args) == 1 else None
    return tp if tp in SCALARS else None


def flags_of(section: str, cls: type, exclude: Iterable[str] = (), prefix: tuple[str, ...] = ()) -> list[Flag]:
    """The flags of one config class (nested dataclasses flattened); `exclude`: dotted paths."""
    exclude = set(exclude)
    hints, comments = typing.get_type_hints(cls), field_comments(cls)
    out: list[Flag] = []
    for f in dataclasses.fields(cls):
        path = (*prefix, f.name)
        if f.name in ALWAYS_EXCLUDED or ".".join(path) in exclude:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += flags_of(section, tp, exclude, path)
        elif (scalar := _scalar(tp)) is not None:
            help_text = f.metadata.get("help") or comments.get(f.name, "")
            names = ("--" + f.name.replace("_", "-"), *f.metadata.get("flags", ()))
            out.append(Flag(section, path, scalar, help_text, names))
    return out


def _option(flag: Flag) -> inspect.Parameter:
    decls = (f"{flag.names[0]}/--no-{flag.names[0][2:]}",) if flag.type is bool else flag.names
    return inspect.Parameter(
        flag.param,
        inspect.Parameter.KEYWORD_ONLY,
        annotation=Optional[flag.type],  # noqa: UP045  (flag.type is a runtime value)
        default=typer.Option(None, *decls, help=flag.help, show_default=False),
    )


def _taken_names(params: Iterable[inspect.Parameter]) -> set[str]:
    names: set[str] = set()
    for p in params:
        for decl in getattr(p.default, "param_decls", None) or ():
            names.update(d for d in decl.split("/") if d.startswith("-"))
    return names


def config_flags(exclude: Iterable[str] = (), **sections: type) -> Callable[[Callable], Callable]:
    """Decorator: add every field of each section's config class as an option to a typer command;
    the command receives them as `overrides: Overrides`. exclude: "section.field[.sub]" paths."""

    def decorate(fn: Callable) -> Callable:
        flags = [
            fl
            for name, cls in sections.items()
            for fl in flags_of(name, cls, [e.split(".", 1)[1] for e in exclude if e.startswith(name + ".")])
        ]
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.name != "overrides"]
        _check_unique(fn.__name__, _taken_names(own), flags)

        @functools.wraps(fn)
        def command(**kw: Any) -> Any:
            values: dict[str, dict[tuple[str, ...], Any]] = {}
            for fl in flags:
                value = kw.pop(fl.param, None)
                if value is not None:
                    values.setdefault(fl.section, {})[fl.path] = value
            return fn(**kw, overrides=Overrides(values))

        command.__signature__ = sig.replace(parameters=own + [_option(fl) for fl in flags])
        command.flags = flags  # for tests and docs
        return command

    return decorate


def _check_unique(command: str, taken: set[str], flags: list[Flag]) -> None:
    """Two fields (or a field and a fixed option) with one flag name would shadow each other."""
    seen = set(taken)
    for fl in flags:
        clash = [n for n in fl.names if n in seen]
        if clash:
            raise TypeError(
                f"{command}: option {clash[0]} of {fl.section}.{'.'.join(fl.path)} is taken; "
                "exclude the field or rename it"
            )
        seen.update(fl.names)
