"""Option aliases shared by every command."""

from __future__ import annotations

from typing import Annotated

import torch
import typer

Model = Annotated[str, typer.Option("--model", "-m", help="Short name, local pipeline folder, or hub id (local HF cache).")]
Device = Annotated[str, typer.Option(help="Torch device, e.g. cuda, cuda:1, cpu.")]
Dtype = Annotated[str, typer.Option(help="Weight dtype: bfloat16, float16 or float32.")]

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise typer.BadParameter(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}") from None
