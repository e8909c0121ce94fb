"""Option aliases shared by every command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer

from ._errors import fail

Model = Annotated[str, typer.Option("--model", "-m", help="Short name, local pipeline folder, or hub id (local HF cache).")]
Device = Annotated[str, typer.Option(help="Torch device: auto (cuda if present, else cpu), cuda, cuda:1, cpu…")]
Dtype = Annotated[str, typer.Option(help="Weight dtype: auto (bfloat16 on GPU, float32 on CPU), bfloat16, "
                                         "float16 or float32.")]

Dino = Annotated[Path | None, typer.Option(help="Local DINOv3 ViT folder (e.g. dinov3-vitb16-pretrain-lvd1689m): "
                                                "its features join the heads' inputs (MMDiff §3.3).")]

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


TASK_ALIASES = {"seg": "seg", "saliency": "saliency", "sal": "saliency", "depth": "depth", "openseg": "openseg"}


def parse_tasks(text: str) -> tuple[str, ...]:
    """"seg,sal" → ("seg", "saliency"): canonical names, in order, without repeats; a usage error otherwise."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in TASK_ALIASES]
    if bad or not names:
        raise typer.BadParameter(f"unknown task {', '.join(bad) or '(none)'}; choose from seg, saliency (sal), depth, "
                                 "openseg")
    return tuple(dict.fromkeys(TASK_ALIASES[t] for t in names))


def read_prompts(path: Path) -> list[str]:
    """Non-blank lines, stripped. An unreadable or empty file is a usage error (exit 2)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except IsADirectoryError:
        fail(f"prompts file {path} is a folder", code=2)
    except FileNotFoundError:
        fail(f"prompts file {path} does not exist", code=2)
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read prompts file {path}: {type(e).__name__}: {e}", code=2)
    prompts = [ln.strip() for ln in lines if ln.strip()]
    if not prompts:
        fail(f"prompts file {path} has no prompts", code=2)
    return prompts
