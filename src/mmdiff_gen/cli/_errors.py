"""One clear line and a non-zero exit for expected failures; MMDIFF_DEBUG=1 shows the traceback."""

from __future__ import annotations

import os
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.markup import escape

err = Console(stderr=True)
# RuntimeError covers backbones' BackboneNotFound (not imported here: that would load diffusers for `--help`).
# ImportError: an optional reader's package is missing (its message says what to install).
_EXPECTED = (ValueError, KeyError, FileNotFoundError, PermissionError, RuntimeError, OSError, ImportError)


def fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def clean_errors(usage: tuple[type[Exception], ...] = ()):
    """Turn library errors into one line on stderr and exit code 1; 2 for the caller's errors in every command
    (errors.SettingsError, a missing input file) and for the `usage` error types."""
    from ..errors import SettingsError

    usage = (SettingsError, FileNotFoundError, *usage)
    try:
        yield
    except typer.Exit:  # click's Exit is a RuntimeError: let a deliberate exit code through
        raise
    except _EXPECTED as e:
        if os.environ.get("MMDIFF_DEBUG"):
            raise
        text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        fail(str(text).splitlines()[0] if str(text) else type(e).__name__, code=2 if isinstance(e, usage) else 1)
