"""The `mmdiff-gen` command line: thin Typer commands over the library."""

from __future__ import annotations

import sys
from contextlib import contextmanager

import typer
from typer.core import TyperGroup

from . import backbone as _backbone
from . import caption as _caption
from . import dataset as _dataset
from . import heads as _heads
from . import look as _look
from . import toy as _toy
from ._root import root as _root

# Click's exceptions as this Typer raises them (recent Typers vendor Click: `typer._click`).
_click = sys.modules[typer.BadParameter.__module__]


@contextmanager
def _interrupted_says_so():
    """Ctrl-C while a command parses or starts (imports, loading): Typer would exit 130 without a word."""
    try:
        yield
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None


class _OneVoice(TyperGroup):
    """Every command speaks alike: a usage error is one line naming the option (exit 2), not Click's usage block;
    Ctrl-C at any moment says so and exits 130 (128 + SIGINT), as a shell reports it."""

    def make_context(self, *args, **kwargs):
        with _interrupted_says_so():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with _interrupted_says_so():
            return super().invoke(ctx)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _click.NoArgsIsHelpError as e:
            e.show()  # `mmdiff-gen` alone, `mmdiff-gen heads`: the help
            sys.exit(e.exit_code)
        except _click.UsageError as e:
            typer.echo(f"error: {e.format_message()}", err=True)
            sys.exit(2)
        except _click.ClickException as e:
            typer.echo(f"error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except typer.Abort as e:
            interrupted = isinstance(e.__cause__, KeyboardInterrupt)
            typer.echo("interrupted" if interrupted else "aborted", err=True)
            sys.exit(130 if interrupted else 1)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=_OneVoice,
    name="mmdiff-gen",
    help="Turn a frozen diffusion transformer into a generator of images with segmentation, saliency and depth.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain text: "[recommendation, else 28]" is not markup to swallow
)
app.callback()(_root)  # --verbose, --version
app.command("generate")(_dataset.generate)
app.command("export")(_dataset.export)
app.command("preview")(_dataset.preview)
app.command("verify")(_dataset.verify)
app.command("info")(_look.info)
app.command("report")(_look.report)
app.command("inspect")(_backbone.inspect)
app.command("capture")(_backbone.capture)
app.command("probe-layers")(_backbone.probe_layers)
app.command("finetune-grounding")(_backbone.finetune_grounding)
app.command("extract")(_heads.extract)
app.command("train")(_heads.train)
app.command("distill")(_heads.distill)
app.command("eval")(_heads.evaluate)
app.command("caption")(_caption.caption)
app.add_typer(_heads.app, name="heads")
app.add_typer(_toy.app, name="toy")


def main() -> None:
    app()
