"""Option aliases shared by every command, and the checks behind them (torch is imported only when used)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ._errors import fail

if TYPE_CHECKING:
    import torch

# Names of torch dtypes, not the dtypes: `--help` must not import torch.
DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
          "float32": "float32", "fp32": "float32"}


def _check_dtype(name: str) -> str:
    """Option callback: an unknown dtype is refused while parsing, before any work (click names the option)."""
    if name != "auto" and name not in DTYPES:
        raise typer.BadParameter(f"unknown dtype {name!r}; choose from auto, {', '.join(DTYPES)}")
    return name


Model = Annotated[str, typer.Option("--model", "-m", help="Short name, local pipeline folder, or hub id (local HF cache).")]
Device = Annotated[str, typer.Option(help="Torch device: auto (cuda if present, else cpu), cuda, cuda:1, cpu…")]
Dtype = Annotated[str, typer.Option(help="Weight dtype: auto (bfloat16 on GPU, float32 on CPU), bfloat16, "
                                         "float16 or float32.", callback=_check_dtype)]

Compile = Annotated[str, typer.Option(
    "--compile", help="torch.compile the transformer, capture hooks inside: off, blocks (each block class once: "
                      "fast warm-up) or transformer (one graph).")]
COMPILE_MODES = ("off", "blocks", "transformer")


def check_compile(mode: str) -> None:
    if mode not in COMPILE_MODES:
        raise typer.BadParameter(f"choose from {', '.join(COMPILE_MODES)}, got {mode!r}", param_hint="'--compile'")


def compile_if(backbone, mode: str) -> None:
    """`--compile`: compile the backbone's transformer (capture's hooks installed first)."""
    if mode != "off":
        from ..capture import compile_backbone

        compile_backbone(backbone, mode)

Dino = Annotated[Path | None, typer.Option(help="Local DINOv3 ViT folder (e.g. dinov3-vitb16-pretrain-lvd1689m): "
                                                "its features join the heads' inputs (MMDiff §3.3).")]


def resolve_device(name: str) -> str:
    """"auto" → cuda when a GPU is visible, else cpu; a device this machine lacks is a usage error (exit 2)."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        fail(f"--device {name}: not a torch device (auto, cpu, cuda, cuda:1, mps…)", code=2)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            fail(f"--device {name}: CUDA is not available on this machine (use --device auto or cpu)", code=2)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            fail(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)", code=2)
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        fail(f"--device {name}: MPS is not available on this machine (use --device auto or cpu)", code=2)
    return name


def torch_dtype(name: str, device: str = "cpu") -> torch.dtype:
    """A dtype name; "auto" is bfloat16 on accelerators (FLUX's native dtype) and float32 on the CPU."""
    import torch

    if name == "auto":
        return torch.float32 if str(device).startswith("cpu") else torch.bfloat16
    try:
        return getattr(torch, DTYPES[name])
    except KeyError:
        raise typer.BadParameter(f"unknown dtype {name!r}; choose from auto, {', '.join(DTYPES)}",
                                 param_hint="'--dtype'") from None


TASK_ALIASES = {"seg": "seg", "saliency": "saliency", "sal": "saliency", "depth": "depth", "openseg": "openseg"}


def parse_tasks(text: str, option: str = "--tasks") -> tuple[str, ...]:
    """"seg,sal" → ("seg", "saliency"): canonical names, in order, without repeats; a usage error naming `option`
    otherwise."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in TASK_ALIASES]
    if bad or not names:
        raise typer.BadParameter(f"unknown task {', '.join(bad) or '(none)'}; choose from seg, saliency (sal), depth, "
                                 "openseg", param_hint=f"'{option}'")
    return tuple(dict.fromkeys(TASK_ALIASES[t] for t in names))


def output_file(path: Path, option: str) -> None:
    """A file a command will write at its end: refuse a folder or a missing parent before the work (exit 2)."""
    if path.is_dir():
        fail(f"{option} {path} is a folder; give a file path", code=2)
    if not path.parent.is_dir():
        fail(f"{option} {path}: folder {path.parent} does not exist", code=2)


def read_prompts(path: Path) -> list[str]:
    """Non-blank lines, stripped; lines whose first non-blank character is `#` are comments. An unreadable file or
    one without prompts is a usage error (exit 2)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except IsADirectoryError:
        fail(f"prompts file {path} is a folder", code=2)
    except FileNotFoundError:
        fail(f"prompts file {path} does not exist", code=2)
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read prompts file {path}: {type(e).__name__}: {e}", code=2)
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        fail(f"prompts file {path} has no prompts", code=2)
    return prompts
