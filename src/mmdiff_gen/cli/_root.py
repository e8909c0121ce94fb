"""The app's own options, given before the command: --version, and --verbose (else third-party noise is off)."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from contextlib import ExitStack, contextmanager
from typing import Annotated

import typer

# Read by each library when it is imported, which the commands do lazily, after this has run; a value the user
# set wins.
_QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",  # e.g. "`CLIPImageProcessor` requires torchvision (not installed)…"
    "DIFFUSERS_VERBOSITY": "error",  # e.g. "The following part of your input was truncated…"
    "HF_HUB_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # downloads, and transformers' "Loading weights" bars
    "TQDM_DISABLE": "1",  # diffusers' "Loading pipeline components…" (diffusers has no switch read at import)
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TORCH_LOGS": "-all",  # torch's import resets its logger to WARNING (e.g. _pytree's notes when torchao loads)
}
# Warnings raised inside these packages; deprecation and future warnings are silenced wherever they come from.
_THIRD_PARTY = (r"(torch|torchvision|torchao|diffusers|transformers|accelerate|huggingface_hub|safetensors|"
                r"webdataset)(\.|$)")
# Plain `logging` loggers: they reach stderr through logging.lastResort (torchao: "Failed to load …so" on import).
_STD_LOGGERS = ("accelerate", "torch", "torchao")


def _restore_env(saved: dict[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@contextmanager
def quiet_third_party():
    """Silence the libraries' logging, progress bars and warnings for one command; everything is restored on exit.

    Libraries not imported yet are quieted through the environment variables they read at import; those already
    imported (a command run in-process, as in tests) through their own switches.
    """
    with ExitStack() as stack:
        stack.callback(_restore_env, {k: os.environ.get(k) for k in _QUIET_ENV})
        for key, value in _QUIET_ENV.items():
            os.environ.setdefault(key, value)
        stack.enter_context(warnings.catch_warnings())
        for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category)
        warnings.filterwarnings("ignore", module=_THIRD_PARTY)
        for name in _STD_LOGGERS:
            logger = logging.getLogger(name)
            # Back to what it was, but never to NOTSET: torch sets WARNING on its loggers at import, and an
            # unset "torch" logger inherits a test runner's DEBUG root, which switches on torch's structured
            # tracing (every compiled graph dumped: a hundredfold slower).
            stack.callback(logger.setLevel, logger.level or logging.WARNING)
            logger.setLevel(logging.ERROR)
        for name in ("diffusers.utils.logging", "transformers.utils.logging"):  # both have the same switches
            lib = sys.modules.get(name)
            if lib is not None:
                stack.callback(lib.set_verbosity, lib.get_verbosity())
                lib.set_verbosity_error()
                if lib.is_progress_bar_enabled():
                    lib.disable_progress_bar()
                    stack.callback(lib.enable_progress_bar)
        yield


def _print_version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"mmdiff-gen {__version__}")
        raise typer.Exit()


def root(
    ctx: typer.Context,
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", envvar="MMDIFF_VERBOSE",
        help="Show the libraries' own logging, progress bars and warnings (diffusers, transformers, torch…); "
             "without it a command prints only its own lines. Give it before the command.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    if not verbose:
        ctx.with_resource(quiet_third_party())
