"""The `caredpo` command: a thin layer over the library, one module per pipeline stage.

`main(argv) -> int` is the entry point for tests and scripts; `run_cli` is the console script.
Bad input surfaces as one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import os
import sys
import warnings

import typer

from ..records import DataError, NonFiniteLossError
from ..video import VideoError
from . import captioner as _captioner
from . import data as _data
from . import dpo as _dpo
from . import export as _export
from . import prefs as _prefs
from . import reranker as _reranker
from . import retriever as _retriever
from . import run as _run

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="CaRe-DPO: captions tuned for text-video retrieval.",
)
_run.register(app)  # the main job first in --help
app.add_typer(_data.app, name="data")
_data.register(app)
app.add_typer(_captioner.app, name="captioner")
app.add_typer(_retriever.app, name="retriever")
_retriever.register(app)
app.add_typer(_reranker.app, name="reranker")
_prefs.register(app)
_dpo.register(app)
_export.register(app)

# Errors a user can fix by changing their input; anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (DataError, VideoError, FileNotFoundError, NonFiniteLossError)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code. Usage errors and --help are handled by typer
    (standalone mode, which exits); user-fixable data errors print one line and return 2."""
    _quiet_libraries()
    try:
        app(args=argv, prog_name="caredpo")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _quiet_libraries() -> None:
    """Offline, and our own progress bars only: set before transformers is first imported."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # peft asks a transformers API that transformers 5 renamed; harmless, and not the user's concern
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def run_cli() -> None:
    sys.exit(main())
