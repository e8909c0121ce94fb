"""`caption`: a VLM's (or the toy oracle's) caption of every image of a dataset, as the JSONL `--captions` reads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ._errors import clean_errors, fail
from ._options import Device, Dtype, output_file, this_device, torch_dtype
from .heads import Data, Split

out = Console(stderr=True)
# As backbones.captioner names them (tests/test_caption.py keeps them equal; importing it here would load torch
# for `--help`).
DEFAULT_CAPTIONER = "google/gemma-3-4b-it"
MAX_NEW_TOKENS = 64


def caption(
    out_path: Annotated[Path, typer.Option("--out", help="JSONL file of {\"key\", \"caption\"} lines (re-run the same "
                                                         "command to resume; other keys in it are kept).")],
    data: Data = None,
    split: Split = None,
    model: Annotated[str, typer.Option("--model", "-m", help="Image-text-to-text model: a local folder or hub id "
                                                             "(local HF cache), or oracle (the toy world's oracle, "
                                                             "on toy renders).")] = DEFAULT_CAPTIONER,
    prompt: Annotated[str | None, typer.Option(help="The instruction after the image [one short factual sentence "
                                                    "naming the main objects, as a text-to-image prompt].")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Longest caption, in tokens.")] = MAX_NEW_TOKENS,
    batch_size: Annotated[int, typer.Option(help="Images per generate call (the unit of resume).")] = 16,
    rank: Annotated[int | None, typer.Option(help="This worker's rank [RANK, SLURM_PROCID, …, else 0].")] = None,
    world_size: Annotated[int | None, typer.Option(help="Number of workers [WORLD_SIZE, SLURM_NTASKS, …, else "
                                                        "1].")] = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
) -> None:
    """Caption every image of a dataset for `--captions` (MMDiff captions real images with Gemma-3-4B).

    Many GPUs: one process per GPU on the same --out (torchrun, srun); worker r captions batches b ≡ r (mod W) into
    OUT.partR-of-W and worker 0 assembles OUT in dataset order."""
    if data is None:
        fail("--data is required (a dataset: voc:PATH, duts:PATH, nyu:PATH, folder:PATH or a files-layout folder)",
             code=2)
    if min(batch_size, max_new_tokens) < 1:
        fail("--batch-size and --max-new-tokens must be ≥ 1", code=2)
    if prompt is not None and not prompt.strip():
        fail("--prompt is empty", code=2)
    output_file(out_path, "--out")
    from ..io.datasets import open_dataset
    from ..jobs.caption import caption_dataset, check_output
    from ..jobs.plan import worker_identity

    dev = this_device(device)  # --rank / --world-size may override the environment's: not worker()
    with clean_errors(usage=(ValueError,)):
        r, w, source = worker_identity(rank, world_size)
    with clean_errors():
        dataset = open_dataset(data, split=split)  # a bad --data fails before a model loads
        choice = captioner_choice(model, prompt=prompt, max_new_tokens=max_new_tokens, device=dev, dtype=dtype)
        check_output(out_path, choice.identity())  # an --out of another captioner: before loading
        captioner = choice.load()
        if w > 1:
            out.print(f"worker {r} of {w} ({source}) on {dev}: batches b ≡ {r} (mod {w})", highlight=False,
                      soft_wrap=True)
        run = caption_dataset(captioner, dataset, out_path, batch_size=batch_size, rank=r, world_size=w, progress=True)
    done = f"{run.written} image(s) captioned now, {run.owned - run.written} already were"
    if run.assembled:
        out.print(f"{out_path}: a caption for each of the {run.total} images of {data} ({done})", highlight=False,
                  soft_wrap=True)
    else:
        out.print(f"worker {r} of {w}: its {run.owned} images are captioned ({done}); worker 0 assembles {out_path}",
                  highlight=False, soft_wrap=True)


def captioner_choice(model: str, *, prompt: str | None = None, max_new_tokens: int = MAX_NEW_TOKENS,
                     device: str = "cpu", dtype: str = "auto"):
    """`--model` of `caption` (and the captioner of `train --recipe`) as a `jobs.caption.CaptionerChoice`: the toy
    oracle, or a VLM with `prompt` (None: the default instruction) on `device` in `dtype`."""
    from ..jobs.caption import CaptionerChoice

    if model == "oracle":
        if prompt is not None:
            fail("--prompt: the toy oracle takes no prompt (it reads the render's objects)", code=2)
        from ..toy.captioner import OracleCaptioner

        return CaptionerChoice(identity=OracleCaptioner.describe, load=lambda: OracleCaptioner.load(device=device))
    from ..backbones.captioner import CAPTION_PROMPT, Captioner, describe

    text = CAPTION_PROMPT if prompt is None else prompt
    return CaptionerChoice(identity=lambda: describe(model, text, max_new_tokens),
                           load=lambda: Captioner.load(model, device=device, dtype=torch_dtype(dtype, device),
                                                       prompt=text, max_new_tokens=max_new_tokens))
