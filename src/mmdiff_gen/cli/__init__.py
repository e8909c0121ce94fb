"""The `mmdiff-gen` command line: thin Typer commands over the library."""

from __future__ import annotations

import typer

from . import backbone as _backbone
from . import caption as _caption
from . import dataset as _dataset
from . import heads as _heads
from . import look as _look
from . import toy as _toy
from ._root import root as _root

app = typer.Typer(
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
