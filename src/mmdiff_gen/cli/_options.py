"""Option aliases shared by every command."""

from __future__ import annotations

from typing import Annotated

import torch
import typer

Model = Annotated[str, typer.Option("--model", "-m", help="Short name, local pipeline folder, or hub id (local HF cache).")]
Device = Annotated[str, typer.Option(help="Torch device: auto (cuda if present, else cpu), cuda, cuda:1, cpu…")]
Dtype = Annotated[str, typer.Option(help="Weight dtype: auto (bfloat16 on GPU, float32 on CPU), bfloat16, "
                                         "float16 or float32.")]

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}


def resolve_device(name: str) -> str:
    """"auto" → cuda when a GPU is visible, else cpu; anything else is passed through to torch."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def torch_dtype(name: str, device: str = "cpu") -> torch.dtype:
    """A dtype name; "auto" is bfloat16 on accelerators (FLUX's native dtype) and float32 on the CPU."""
    if name == "auto":
        return torch.float32 if str(device).startswith("cpu") else torch.bfloat16
    try:
        return DTYPES[name]
    except KeyError:
        raise typer.BadParameter(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}") from None
