"""Option aliases shared by every command, and the checks behind them (torch is imported only when used)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ._errors import clean_errors, fail

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

HeadsPrecision = Annotated[str, typer.Option(
    "--precision", help="Heads' arithmetic: auto (bf16 autocast on CUDA, float32 elsewhere), bf16 or fp32.",
    callback=lambda v: _one_of(v, ("auto", "bf16", "fp32"), "--precision"))]


def _one_of(value: str, choices: tuple[str, ...], option: str) -> str:
    if value not in choices:
        raise typer.BadParameter(f"choose from {', '.join(choices)}, got {value!r}", param_hint=f"'{option}'")
    return value


# As backbones.runtime names them (a test keeps the two equal; importing it here would load torch for `--help`).
OFFLOAD_MODES = ("none", "model", "sequential", "group")
STORAGE_MODES = ("full", "fp8", "int8")


Offload = Annotated[str, typer.Option(
    help="Keep weights off the GPU between calls (needs a GPU): none, model (each component moved in for its "
         "forward), sequential (layer by layer: least memory, slowest) or group (each layer prefetched on a "
         "CUDA stream: little GPU memory, pinned host memory for all weights).", callback=lambda v: _one_of(v, OFFLOAD_MODES, "--offload"))]
Storage = Annotated[str, typer.Option(
    help="How the transformer's weights are stored: full (--dtype), fp8 (float8, each layer computed in "
         "--dtype) or int8 (torchao int8 weight-only: pip install torchao).",
    callback=lambda v: _one_of(v, STORAGE_MODES, "--storage"))]


def check_runtime(offload: str, storage: str, device: str) -> None:
    """--offload / --storage against the device, before anything loads: offload on a CPU is a usage error (exit 2);
    int8 without torchao says what to install (exit 1)."""
    from ..backbones.runtime import check_runtime as check

    with clean_errors(usage=(ValueError,)):
        check(offload, storage, device=device)


# As train.feature_codec.CODECS names them (a test keeps the two equal).
FEATURE_CODECS = ("bf16", "int8", "fp8")
DEFAULT_CODEC = "int8"  # train.feature_codec.DEFAULT
Codec = Annotated[str, typer.Option(
    help="How the feature cache stores features: int8 or fp8 (8 bits with a scale per token: half the disk; "
         "BENCHMARKS.md measures what it changes) or bf16 (as captured).",
    callback=lambda v: _one_of(v, FEATURE_CODECS, "--codec"))]


# As capture.spec.BLOCKS names them (a test keeps the two equal).
BLOCK_LISTS = ("feature", "joint")
Blocks = Annotated[str, typer.Option(
    help="Blocks whose image tokens are the features: feature (FLUX: single-stream) or joint (FLUX: double-stream).",
    callback=lambda v: _one_of(v, BLOCK_LISTS, "--blocks"))]


Compile = Annotated[str, typer.Option(
    "--compile", help="torch.compile the transformer, capture hooks inside: off, blocks (each block class once: "
                      "fast warm-up) or transformer (one graph).")]
COMPILE_MODES = ("off", "blocks", "transformer")


def check_compile(mode: str, offload: str) -> None:
    """--compile against --offload, before anything loads (capture.compile_backbone refuses the same)."""
    if mode not in COMPILE_MODES:
        raise typer.BadParameter(f"choose from {', '.join(COMPILE_MODES)}, got {mode!r}", param_hint="'--compile'")
    if mode != "off":
        from ..backbones.runtime import check_compilable

        with clean_errors(usage=(ValueError,)):
            check_compilable(offload)


def compile_if(backbone, mode: str) -> None:
    """`--compile`: compile the backbone's transformer (capture's hooks installed first)."""
    if mode != "off":
        from ..capture import compile_backbone

        compile_backbone(backbone, mode)

Lora = Annotated[Path | None, typer.Option(help="A diffusers LoRA (.safetensors file, or a folder holding "
                                                "pytorch_lora_weights.safetensors, e.g. from finetune-grounding) loaded "
                                                "into the transformer; heads check it.")]
LoraScale = Annotated[float, typer.Option(help="The LoRA's weight (0: the base model's outputs).")]
Dino = Annotated[Path | None, typer.Option(help="Local DINOv3 ViT folder (e.g. dinov3-vitb16-pretrain-lvd1689m): "
                                                "its features join the heads' inputs (MMDiff §3.3).")]


def resolve_device(name: str) -> str:
    """"auto" → cuda when a GPU is visible, else cpu; a device this machine lacks is a usage error (exit 2)."""
    from ..backbones.runtime import resolve_device as resolve

    with clean_errors(usage=(ValueError,)):
        return resolve(name)


def torch_dtype(name: str, device: str = "cpu") -> torch.dtype:
    """A dtype name; "auto" is bfloat16 on accelerators (FLUX's native dtype) and float32 on the CPU."""
    from ..backbones.runtime import torch_dtype as dtype

    try:
        return dtype(name, device)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="'--dtype'") from None


def parse_tasks(text: str, option: str = "--tasks") -> tuple[str, ...]:
    """"seg,sal" → ("seg", "saliency"): the registry's canonical names, in order, without repeats; a usage error
    naming `option` otherwise."""
    from .. import tasks

    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise typer.BadParameter(f"no task given; choose from {tasks.known()}", param_hint=f"'{option}'")
    try:
        return tasks.canonical(names)
    except KeyError as e:  # "unknown task 'x'; known: seg, saliency (sal), …"
        raise typer.BadParameter(e.args[0], param_hint=f"'{option}'") from None


def output_file(path: Path, option: str) -> None:
    """A file a command will write at its end: refuse a folder or a missing parent before the work (exit 2)."""
    if path.is_dir():
        fail(f"{option} {path} is a folder; give a file path", code=2)
    if not path.parent.is_dir():
        fail(f"{option} {path}: folder {path.parent} does not exist", code=2)


def read_prompts(path: Path) -> list[str]:
    """jobs.plan.read_prompts; an unreadable file or one without prompts is a usage error (exit 2)."""
    from ..jobs.plan import read_prompts as read

    try:
        return read(path)
    except ValueError as e:
        fail(str(e), code=2)


def worker(device: str, env: dict[str, str] | None = None) -> tuple[str, int, int, str]:
    """(device, rank, world size, where they came from) of this worker: `cuda` becomes its GPU (LOCAL_RANK /
    SLURM_LOCALID, made current before anything is placed), rank and world size as `generate` reads them
    (from `env`, default os.environ)."""
    from ..jobs.plan import worker_identity

    dev = this_device(device, env)
    with clean_errors(usage=(ValueError,)):
        r, w, source = worker_identity(env=env)
    return dev, r, w, source


def this_device(device: str, env: dict[str, str] | None = None) -> str:
    """--device for this worker (`cuda` → its GPU, jobs.plan.local_device), made current before anything is
    placed: CUDA streams (group offload's prefetch) and events are created on the current device, cuda:0
    for every worker otherwise."""
    from ..jobs.plan import local_device

    dev = local_device(resolve_device(device), env)
    if dev.startswith("cuda:"):
        import torch

        torch.cuda.set_device(dev)
    return dev


def parse_bytes(text: str, option: str) -> int:
    """"2G" → 2 GiB; K, M, G, T are binary (an optional trailing B or iB is allowed); a plain number is bytes."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, flags=re.IGNORECASE)
    value = int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " ")) if m else 0
    if value < 1:
        raise typer.BadParameter(f"a size such as 2G, 512M or 1000000 expected, got {text!r}", param_hint=f"'{option}'")
    return value
