"""GPU check: what capture costs at 1024² (time per image, peak GPU memory), then offload, storage and compile rows.

Meant for one H100 (or H200), one run of at most 10 minutes, no network (no downloads: the 1024² backbone is
built from a config with random weights and the toy backbone ships in the package):

    python bench/gpu_check.py                           # CUDA, bfloat16; prints a markdown table
    python bench/gpu_check.py --preflight-only          # the first line only: what is missing on this machine
    python bench/gpu_check.py --smoke --device cpu      # each kind of row at toy sizes, aot_eager: seconds

The first line printed is the pre-flight: the versions of torch, diffusers, transformers, accelerate, safetensors,
huggingface-hub, tokenizers, numpy and pillow against pyproject.toml's requirements, the requirements diffusers,
transformers and accelerate declare themselves (wheels installed with --no-deps bring none), whether the bench's
own imports work, CUDA, and the optional packages some rows need (torchao: int8 storage; triton: inductor compile
rows on CUDA). Something essential missing, too old or failing to import exits 2 right there; a missing optional
package skips only the rows that need it.

Rows, in order, so that the figures users need come first when the budget runs out:

1. 1024² FLUX architecture (4 096 image + 512 text tokens and width 3 072, as FLUX.1-dev; 2 double + 4 single
   blocks, random weights; 28 steps, batch 2, paper sigmas, seg concepts): a plain pipeline call (no capture),
   `generate` with capture `store_device="cpu"` (features copied off the GPU into pinned host memory as they are
   produced), `generate` with capture kept on the GPU, `extract` (real-image mode) with `store_device="cpu"`;
   then `offload="model"` and `"group"`; `storage="fp8"` and `"int8"`; compiled by blocks, by blocks over group
   offload, by blocks over fp8 storage, as a whole transformer (inductor); `offload="sequential"` last (one
   timed batch: its every forward streams all weights).
2. 1024² FLUX.2 and Qwen-Image architectures (random weights: FLUX.2 [dev]'s width 6 144 in 1 double + 2 single
   blocks, [klein] base sampling with CFG 4 as a second call; Qwen-Image's width 3 072 in 4 dual-stream blocks,
   true CFG 4 as a second call; 28 steps, batch 2): plain, capture on the CPU and on the GPU, leaf-level group
   offload, compiled by blocks.
3. The toy backbone (64×64, 24 steps, true CFG 5, batch 16, its shipped heads' capture spec): plain, capture on
   the CPU and on the GPU, compiled by blocks and as a whole transformer.

Every row after the plain call captures with `store_device="cpu"` unless it says otherwise.

Each row builds its backbone afresh (nothing of the previous row alive: its objects deleted, `gc.collect()`,
`torch.cuda.empty_cache()`; "GPU GiB at start" shows what was still allocated), warms it up once (compiling
where it compiles), compares the warm-up's images and features with the reference rows' (images: the plain
call; features: the first capture row), deletes them and empties the cache, then resets the peak counter and
times `--repeats` batches (median), each batch's outputs released before the next. Columns: build and warm-up
seconds, seconds per image, images/s and its ratio to the plain call, GPU memory allocated at the start, after
loading, the peak of the warm-up and the peak of the timed batches (`torch.cuda.max_memory_allocated`) and that
peak minus the plain call's, the largest difference from the references (fp8 / int8 also image PSNR) and the
graphs compiled. A row that fails is reported with its error and the rest still run. A row is started only
while the time left in `--budget-s` covers its estimate (measured plain batch time × the row's slowdown, plus a
compile allowance); the rows skipped are listed. The table is rewritten to $OUT/gpu_check.md (or --md) after
every row, so a run killed at its time limit keeps its rows.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import importlib
import importlib.metadata
import math
import os
import platform
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

try:  # failures here are the pre-flight's to report, in its one line: main() speaks before it needs any of them
    import numpy as np
    import torch
    import torch._dynamo

    from mmdiff_gen.backbones import load_backbone, wrap_pipeline
    from mmdiff_gen.backbones.loading import DEFAULT_HEADS
    from mmdiff_gen.backbones.runtime import apply_runtime
    from mmdiff_gen.backbones.tiny import build_tiny_flux, build_tiny_flux2, build_tiny_qwenimage
    from mmdiff_gen.capture import CaptureSpec, compile_backbone, compiled_graphs, extract, generate, plan_schedule
    from mmdiff_gen.capture._noise import generators_for
    from mmdiff_gen.jobs.annotate import Annotator, head_files
    from mmdiff_gen.tasks import get as get_task
    from mmdiff_gen.toy.world import render_scene

    IMPORT_ERROR: Exception | None = None
except Exception as _e:  # noqa: BLE001
    IMPORT_ERROR = _e

# --------------------------------------------------------------------------------------------------------------
# Pre-flight

#: What every row needs: distribution names as pyproject.toml spells them (huggingface-hub comes from
#: diffusers' and transformers' own requirements, not ours).
ESSENTIAL = ("torch", "diffusers", "transformers", "accelerate", "safetensors", "huggingface-hub", "tokenizers",
             "numpy", "pillow")
#: Installed with --no-deps on the device: their own requirements are checked too (reported, not fatal).
DECLARING = ("diffusers", "transformers", "accelerate")
#: Modules whose import must work (the bench's own imports last).
IMPORTS = ("torch", "diffusers", "transformers", "accelerate", "safetensors", "huggingface_hub", "tokenizers",
           "mmdiff_gen.capture")
#: Optional packages → the rows that need them (peft: no row does).
OPTIONAL = {"torchao": "int8 storage", "triton": "inductor compile rows"}


def _installed(dist: str) -> str | None:
    """The installed version of a distribution, or None (tests replace this to simulate a machine)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def project_requirements() -> dict[str, str]:
    """normalized name → version specifier, from pyproject.toml's dependencies and optional dependencies."""
    text = (ROOT / "pyproject.toml").read_text()
    try:
        import tomllib

        data = tomllib.loads(text)["project"]
        extras = data.get("optional-dependencies", {}).values()
        reqs = list(data.get("dependencies", [])) + [r for group in extras for r in group]
    except ImportError:  # Python 3.10: every quoted requirement string of the file
        reqs = re.findall(r'"([A-Za-z0-9][A-Za-z0-9_.\-]*(?:\[[^\]]*\])?\s*[<>=!~][^"]*)"', text)
    out: dict[str, str] = {}
    for r in reqs:
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9_.\-]*)\s*(?:\[[^\]]*\])?\s*([^;]*)", r)
        if m:
            out.setdefault(_norm(m.group(1)), m.group(2).strip())
    return out


def _satisfies(version: str, spec: str) -> bool | None:
    """Whether `version` meets `spec` (None: packaging is absent, so it cannot be told)."""
    if not spec:
        return True
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version
    except ImportError:
        return None
    return SpecifierSet(spec).contains(Version(version), prereleases=True)


@dataclass
class Preflight:
    line: str
    fatal: bool
    skip: dict[str, str]  # optional package → why it is unusable


def preflight(device: str, backend: str) -> Preflight:
    """Every check at once, summed up in one line."""
    reqs = project_requirements()
    fatal: list[str] = []
    warn: list[str] = []
    have: list[str] = []
    for dist in ESSENTIAL:
        v, spec = _installed(dist), reqs.get(_norm(dist), "")
        if v is None:
            fatal.append(f"{dist} absent{f' (needs {spec})' if spec else ''}")
            continue
        ok = _satisfies(v, spec)
        if ok is False:
            fatal.append(f"{dist} {v} (pyproject: {spec})")
        have.append(f"{dist} {v}")
    unchecked = _satisfies("1", ">=0") is None
    for dist in DECLARING:
        v = _installed(dist)
        if v is None or unchecked:
            continue
        from packaging.requirements import Requirement

        for r in importlib.metadata.requires(dist) or []:
            try:
                req = Requirement(r)
                if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                    continue
            except Exception:  # noqa: BLE001 — a malformed declaration is not ours to judge
                continue
            got = _installed(req.name)
            if got is None:
                warn.append(f"{req.name} absent ({dist} {v} declares {req.specifier or 'it'})")
            elif req.specifier and not req.specifier.contains(got, prereleases=True):
                warn.append(f"{req.name} {got} ({dist} {v} declares {req.specifier})")
    for mod in IMPORTS:
        try:
            importlib.import_module(mod)
        except Exception as e:  # noqa: BLE001 — what fails to import is what the line must say
            fatal.append(f"import {mod} fails: {one_line(e)}")
    if not any(f.startswith("import ") for f in fatal):
        try:
            from diffusers import FluxPipeline, FluxTransformer2DModel  # noqa: F401 — lazy: imports the real code
        except Exception as e:  # noqa: BLE001
            fatal.append(f"diffusers' FluxPipeline fails to import: {one_line(e)}")
        if IMPORT_ERROR is not None:
            fatal.append(f"the bench's imports fail: {one_line(IMPORT_ERROR)}")
    try:
        import torch as t
    except Exception:  # noqa: BLE001 — already named above
        t = None
    if not device.startswith("cuda"):
        where = f"CPU run (--device {device})"
    elif t is None:
        where = "CUDA unknown (no torch)"
    elif not t.cuda.is_available():
        why = (f"torch {t.__version__} is a CPU build" if t.version.cuda is None
               else f"torch built for CUDA {t.version.cuda} sees no device")
        where = "no CUDA"
        fatal.append(f"CUDA not available ({why})")
    else:
        p = t.cuda.get_device_properties(t.device(device))
        where = f"CUDA {t.version.cuda}: {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}"
    skip: dict[str, str] = {}
    v = _installed("torchao")
    spec = reqs.get("torchao", "")
    if v is None:
        skip["torchao"] = "torchao absent"
    elif _satisfies(v, spec) is False:
        skip["torchao"] = f"torchao {v} too old (pyproject: {spec})"
    else:
        try:
            importlib.import_module("torchao.quantization")
            have.append(f"torchao {v}")
        except Exception as e:  # noqa: BLE001 — e.g. built for another torch
            skip["torchao"] = f"torchao {v} fails to import: {one_line(e)}"
    if device.startswith("cuda") and backend == "inductor":
        v = _installed("triton") or _installed("pytorch-triton")
        if v is None:
            skip["triton"] = "triton absent"
        else:
            have.append(f"triton {v}")
    bad = fatal + warn + [f"{why} (skips {OPTIONAL[name]})" for name, why in skip.items()]
    parts = [f"pre-flight: {'FATAL, ' if fatal else ''}missing or too old: {'; '.join(bad) if bad else 'nothing'}"]
    if warn and not fatal:
        parts.append("declared requirements unmet are reported, not enforced")
    parts.append(f"have: {', '.join(have)}; python {platform.python_version()}; {where}")
    return Preflight(" | ".join(parts), bool(fatal), skip)


# --------------------------------------------------------------------------------------------------------------
# Rows


@dataclass(frozen=True)
class Variant:
    """One row: how the backbone is held and run."""

    label: str
    mode: str = "generate"  # "plain" (pipeline call, no capture), "generate" or "extract"
    store: str | None = "cpu"  # CaptureSpec.store_device
    offload: str = "none"
    storage: str = "full"
    compile: str | None = None  # compile_backbone mode
    needs: tuple[str, ...] = ()  # optional packages (OPTIONAL)
    cuda_only: str = ""  # why the row cannot run on the CPU ("": it can)
    repeats: int | None = None  # timed batches (None: --repeats)
    slowdown: float = 1.0  # budget estimate: a batch's time / the plain call's
    compile_s: float = 0.0  # budget estimate: inductor's warm-up at 1024² on an H100, seconds


# In the order they run: the figures users need first (capture's cost at 1024², then the ways to fit a smaller
# card), compiles last (the longest warm-ups), sequential offload at the end (every forward streams every weight).
VARIANTS: dict[str, Variant] = {
    "plain": Variant("plain pipeline call, no capture (eager)", mode="plain", store=None),
    "capture cpu": Variant('`generate`, capture `store_device="cpu"` (pinned host copies)'),
    "capture gpu": Variant("`generate`, capture kept on the compute device", store=None),
    "extract cpu": Variant('`extract` (real images: B × 4 sigmas in one forward), `store_device="cpu"`',
                           mode="extract", slowdown=0.3),
    "offload model": Variant('`offload="model"`', offload="model", slowdown=1.5),
    "offload group": Variant('`offload="group"` (leaf level, CUDA stream)', offload="group", slowdown=3.0),
    "fp8 storage": Variant('`storage="fp8"` (layerwise casting)', storage="fp8", slowdown=1.5),
    "int8 storage": Variant('`storage="int8"` (torchao weight-only)', storage="int8", needs=("torchao",),
                            slowdown=1.5),
    "compile blocks": Variant('`compile_backbone(bb, "blocks")`', compile="blocks", needs=("triton",),
                              compile_s=60.0),
    "compile blocks + offload group": Variant('compiled by blocks, `offload="group"`', offload="group",
                                              compile="blocks", needs=("triton",), slowdown=3.0, compile_s=90.0),
    "compile blocks + fp8 storage": Variant('compiled by blocks, `storage="fp8"`', storage="fp8", compile="blocks",
                                            needs=("triton",), slowdown=1.5, compile_s=90.0),
    "compile transformer": Variant('`compile_backbone(bb, "transformer")`', compile="transformer",
                                   needs=("triton",), compile_s=150.0),
    "offload sequential": Variant('`offload="sequential"` (1 timed batch)', offload="sequential", repeats=1,
                                  slowdown=15.0, cuda_only="accelerate's sequential offload cannot onload to the CPU"),
}
FAMILY_ROWS = ("plain", "capture cpu", "capture gpu", "offload group", "compile blocks")
CASE_ROWS = {"flux1024": tuple(VARIANTS), "flux2_1024": FAMILY_ROWS, "qwen1024": FAMILY_ROWS,
             "toy": ("plain", "capture cpu", "capture gpu", "compile blocks", "compile transformer")}
# --smoke: each kind of row once, in the same order (the combinations of compile with offload or fp8, and the toy's
# compiles, are tests/test_compile.py's), so the CPU run takes seconds.
SMOKE_ROWS = {"flux1024": tuple(k for k in CASE_ROWS["flux1024"]
                                if k == "compile blocks" or not k.startswith("compile")),
              "flux2_1024": ("plain", "capture cpu"), "qwen1024": ("plain", "capture cpu"),
              "toy": ("plain", "capture cpu")}
CASES = ("flux1024", "flux2_1024", "qwen1024", "toy")  # in this order
NAMES = {"flux1024": "FLUX arch", "flux2_1024": "FLUX.2 arch", "qwen1024": "Qwen-Image arch", "toy": "toy"}


def case_name(key: str, smoke: bool) -> str:
    return NAMES[key] + (" (smoke)" if smoke else "" if key == "toy" else " 1024²")


# The 1024² backbone: FLUX.1-dev's geometry (8× VAE, 2×2 packing → 64×64 = 4 096 image tokens, 512 text tokens,
# 24 heads × 128 = width 3 072, so captured features have FLUX.1-dev's size) at a depth that builds in seconds.
FLUX_1024 = dict(dim_head=128, heads=24, text_width=256, text_layers=2, vae_channels=(32, 64, 128, 128),
                 t5_max_length=512)
SMOKE_TINY = dict(double_blocks=1, single_blocks=1, text_layers=1)  # fewer ops: quick aot_eager warm-ups
PROMPTS = ["a large red circle on the left", "a small blue star in the center", "a green square on the right",
           "a yellow ring and a black cross"]


@dataclass
class Case:
    """One backbone: how to build it for a row, what to capture, how to sample."""

    key: str
    name: str
    about: str  # one line under the table
    build: Callable[[str, str], Any]  # (offload, storage) → Backbone
    spec: CaptureSpec
    kw: dict
    prompts: list[str]
    images: Any  # (B, 3, H, W) in [0, 1]: extract's input


@dataclass
class Row:
    case: str  # key: flux1024, toy
    backbone: str
    variant: str
    status: str = "ok"
    batch: int = 0
    build_s: float = float("nan")
    warmup_s: float = float("nan")
    batch_s: float = float("nan")
    images_per_s: float = float("nan")
    start_gib: float = float("nan")
    loaded_gib: float = float("nan")
    warmup_peak_gib: float = float("nan")
    peak_gib: float = float("nan")
    graphs: int | None = None
    diff: dict = field(default_factory=dict)


def _images(b: int, size: int) -> Any:
    """Fixed smooth test images for `extract` (content does not change its cost)."""
    g = torch.Generator().manual_seed(0)
    low = torch.rand((b, 3, 8, 8), generator=g)
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


def _geometry(bb, spec, height: int, width: int, channels: int) -> tuple[int, int]:
    """(image tokens, bytes of captured features per image)."""
    layers = spec.layers if spec.layers is not None else bb.default_layers(blocks=spec.blocks)
    h, w = bb.token_grid(height, width)
    return h * w, len(layers) * len(spec.sigmas) * h * w * channels * spec.torch_store_dtype.itemsize


def flux_1024_case(dtype, device: str, smoke: bool, batch: int, steps: int, blocks: tuple[int, int]) -> Case:
    arch = dict(SMOKE_TINY) if smoke else dict(FLUX_1024, double_blocks=blocks[0], single_blocks=blocks[1])
    base = build_tiny_flux(seed=0, **arch)
    if dtype != torch.float32:
        base.to(dtype=dtype)

    def build(offload: str, storage: str):
        pipe = copy.deepcopy(base)  # on the CPU: every row starts from the same weights, nothing moved yet
        apply_runtime(pipe, offload=offload, storage=storage, dtype=dtype, device=device)
        return wrap_pipeline(pipe, "flux-arch-1024")

    size = 64 if smoke else 1024
    kw = dict(height=size, width=size, num_inference_steps=2 if smoke else steps, guidance_scale=3.5,
              max_sequence_length=32 if smoke else 512)
    spec = CaptureSpec(concepts=get_task("seg").concepts, layers=(0,) if smoke else None)
    tr = base.transformer
    width = tr.config.num_attention_heads * tr.config.attention_head_dim
    params = sum(p.numel() for p in tr.parameters())
    count = f"{params / 1e9:.2f} B" if params >= 1e8 else f"{params / 1e6:.1f} M"
    tokens, feat = _geometry(wrap_pipeline(base, "flux-arch-1024"), spec, size, size, width)
    name = case_name("flux1024", smoke)
    about = (f"{name}: random weights from a config; {size}×{size} ({tokens} image + "
             f"{kw['max_sequence_length']} text tokens), width {width}, {tr.config.num_layers} double + "
             f"{tr.config.num_single_layers} single blocks ({count} transformer parameters; FLUX.1-dev: "
             f"3 072, 19 + 38, 11.9 B), {kw['num_inference_steps']} steps, batch {batch}; capture: paper sigmas, "
             f"seg concepts, {feat / 2**20:.3g} MiB of features per image")
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    return Case("flux1024", name, about, build, spec, kw, prompts, _images(batch, size))


def family_case(key: str, dtype, device: str, smoke: bool, batch: int, steps: int) -> Case:
    """FLUX.2 or Qwen-Image at 1024² from a tiny builder at the released width, few blocks, random weights."""
    if key == "flux2_1024":
        arch = (dict(double_blocks=1, single_blocks=1, text_layers=28) if smoke else
                dict(dim_head=128, heads=48, double_blocks=1, single_blocks=2, text_width=64,
                     vae_channels=(32, 64, 128, 128), latent_channels=32))
        base, guidance = build_tiny_flux2(seed=0, distilled=False, **arch), dict(guidance_scale=4.0)
        text = 512  # the FLUX.2 pipelines pad the text to max_sequence_length
    else:
        arch = (dict(blocks=1) if smoke else
                dict(dim_head=128, heads=24, blocks=4, text_width=256, latent_channels=16, vae_downsamples=3))
        base, guidance = build_tiny_qwenimage(seed=0, **arch), dict(true_cfg_scale=4.0, negative_prompt="")
        text = 64  # Qwen-Image's text is the prompt's own tokens
    if dtype != torch.float32:
        base.to(dtype=dtype)

    def build(offload: str, storage: str):
        pipe = copy.deepcopy(base)
        apply_runtime(pipe, offload=offload, storage=storage, dtype=dtype, device=device)
        return wrap_pipeline(pipe, key)

    size = 64 if smoke else 1024
    kw = dict(height=size, width=size, num_inference_steps=2 if smoke else steps, max_sequence_length=text, **guidance)
    # --smoke: 2 steps cannot hold the paper's sigmas under FLUX.2's shift; one extra forward shows the plumbing.
    spec = CaptureSpec(concepts=get_task("seg").concepts, **(dict(layers=(0,), sigmas=(0.001,)) if smoke else {}))
    bb = wrap_pipeline(base, key)
    params = sum(p.numel() for p in bb.transformer.parameters())
    tokens, feat = _geometry(bb, spec, size, size, bb.feature_dim)
    name = case_name(key, smoke)
    about = (f"{name}: random weights from a config; {size}×{size} ({tokens} image tokens), width {bb.feature_dim}, "
             f"{len(bb.joint_blocks)} joint / {len(bb.feature_blocks)} feature blocks ({params / 1e9:.2f} B "
             f"transformer parameters), {kw['num_inference_steps']} steps, {guidance}, batch {batch}; capture: sigmas "
             f"{spec.sigmas}, seg concepts, {feat / 2**20:.3g} MiB of features per image")
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    return Case(key, name, about, build, spec, kw, prompts, _images(batch, size))


def toy_case(dtype, device: str, smoke: bool, batch: int, steps: int, blocks: tuple[int, int]) -> Case:
    def build(offload: str, storage: str):
        return load_backbone("toy", dtype=dtype, device=device, offload=offload, storage=storage)

    bb = load_backbone("toy", dtype=dtype, device="cpu")
    spec = Annotator(head_files(Path(DEFAULT_HEADS["toy"]), ["seg", "saliency", "depth"]), bb.identity()).spec()
    kw = bb.sampling_kwargs(num_inference_steps=2 if smoke else None)
    b = 1 if smoke else 16
    prompts = [render_scene(9_200_000 + i).caption for i in range(b)]
    name = case_name("toy", smoke)
    about = (f"{name}: the embedded toy backbone, {kw['height']}×{kw['width']}, {kw['num_inference_steps']} steps, "
             f"true CFG {kw.get('true_cfg_scale')}, batch {b}, its shipped heads' capture spec")
    return Case("toy", name, about, build, spec, kw, prompts, _images(b, kw["height"]))


def flux2_case(dtype, device: str, smoke: bool, batch: int, steps: int, blocks: tuple[int, int]) -> Case:
    return family_case("flux2_1024", dtype, device, smoke, batch, steps)


def qwen_case(dtype, device: str, smoke: bool, batch: int, steps: int, blocks: tuple[int, int]) -> Case:
    return family_case("qwen1024", dtype, device, smoke, batch, steps)


MAKERS = {"flux1024": flux_1024_case, "flux2_1024": flux2_case, "qwen1024": qwen_case, "toy": toy_case}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_once(bb, case: Case, v: Variant, spec, device: str):
    """(seconds, images (B, H, W, 3) float 0–1 or None, features or None)."""
    seeds = list(range(len(case.prompts)))
    sync(device)
    t0 = time.perf_counter()
    images = feats = None
    if v.mode == "plain":  # the contract schedule generate follows, so the images match
        plan = plan_schedule(bb, spec, case.kw["num_inference_steps"], case.kw["height"], case.kw["width"])
        images = bb.pipe(prompt=case.prompts, generator=generators_for(seeds), sigmas=list(plan.pipeline_sigmas),
                         output_type="np", **case.kw).images
    elif v.mode == "generate":
        gen = generate(bb, case.prompts, spec, seeds=seeds, output_type="np", **case.kw)
        images, feats = gen.images, gen.capture.features
    else:
        feats = extract(bb, case.images, spec, captions=case.prompts, seeds=seeds,
                        guidance_scale=case.kw.get("guidance_scale"),
                        max_sequence_length=case.kw.get("max_sequence_length")).features
    sync(device)
    return time.perf_counter() - t0, None if images is None else np.asarray(images, dtype=np.float32), feats


def psnr(a, b) -> float:
    mse = float(((a.astype(np.float64) - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def gib(x: int) -> float:
    return x / 2**30


def free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def compare(row: Row, v: Variant, images, feats, ref: dict, device: str) -> None:
    """Against the references (images: the first row with images, the plain call; features: the first `generate`
    row), kept on the host; the first row of each becomes it. Features are compared on the compute device, one
    layer at a time (at 1024² a batch's are 768 MiB)."""
    if images is not None:
        if "images" not in ref:
            ref["images"] = images
            row.diff["ref"] = "images"
        else:
            row.diff["images"] = float(np.abs(images - ref["images"]).max())
            if v.storage != "full":
                row.diff["psnr"] = psnr(images, ref["images"])
    if feats is not None and v.mode == "generate":
        if "features" not in ref:
            ref["features"] = feats.detach().to("cpu", copy=True)  # a copy: never a view of capture's pinned buffer
            row.diff["ref"] = "features" if "ref" not in row.diff else "images, features"
        elif feats.shape == ref["features"].shape:
            dev = torch.device(device)
            row.diff["features"] = max(float((a.to(dev).float() - b.to(dev).float()).abs().max())
                                       for a, b in zip(feats.unbind(1), ref["features"].unbind(1)))


def run_row(case: Case, key: str, device: str, backend: str, repeats: int, ref: dict, deadline: float) -> Row:
    v = VARIANTS[key]
    row = Row(case.key, case.name, key, batch=len(case.prompts))
    cuda = device.startswith("cuda")
    free(device)
    if cuda:
        row.start_gib = gib(torch.cuda.memory_allocated())  # ≈ 0: nothing of the previous row is alive
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    bb = case.build(v.offload, v.storage)
    row.build_s = time.perf_counter() - t0
    if cuda:
        row.loaded_gib = gib(torch.cuda.memory_allocated())
    before = 0
    if v.compile is not None:
        torch._dynamo.reset()
        before = compiled_graphs()
        compile_backbone(bb, v.compile, backend=backend)
    spec = dataclasses.replace(case.spec, store_device=v.store)
    row.warmup_s, images, feats = run_once(bb, case, v, spec, device)
    if cuda:
        row.warmup_peak_gib = gib(torch.cuda.max_memory_allocated())
    if v.compile is not None:
        row.graphs = compiled_graphs() - before
    compare(row, v, images, feats, ref, device)
    del images, feats  # the warm-up's outputs must not count in the timed batches' peak
    free(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()  # from here: weights held + one batch's activations and outputs
    times: list[float] = []
    for _ in range(v.repeats or repeats):
        if times and time.monotonic() + times[-1] > deadline:
            break  # keep the whole check inside its budget
        times.append(run_once(bb, case, v, spec, device)[0])  # the batch's outputs die with the tuple
    if v.compile is not None:
        row.graphs = compiled_graphs() - before  # later identical batches must build nothing more
    row.batch_s = statistics.median(times)
    row.images_per_s = row.batch / row.batch_s
    if cuda:
        row.peak_gib = gib(torch.cuda.max_memory_allocated())
    del bb
    if v.compile is not None:
        torch._dynamo.reset()  # the next row starts from no compiled code
    return row


def estimate(v: Variant, plain_s: float, build_s: float, repeats: int, backend: str) -> float:
    """Seconds a row should take, from the plain call's measured batch time (0 before it ran)."""
    batch = (0.0 if math.isnan(plain_s) else plain_s) * v.slowdown
    compile_s = v.compile_s if v.compile and backend == "inductor" else 0.0
    return (0.0 if math.isnan(build_s) else build_s) + batch * (1 + (v.repeats or repeats)) + compile_s


# --------------------------------------------------------------------------------------------------------------
# Report


def one_line(e: BaseException) -> str:
    """An error as one table cell."""
    msg = (str(e).strip().splitlines() or [""])[0][:160].replace("|", "/")
    return f"{type(e).__name__}: {msg}"


def fmt(x: float, spec: str = ".3f") -> str:
    return "—" if math.isnan(x) else format(x, spec)


def diff_text(d: dict) -> str:
    out = [f"reference ({d['ref']})"] if "ref" in d else []
    if "images" in d:
        out.append("images exact" if d["images"] == 0 else f"images {d['images']:.2e}")
        if d.get("psnr", float("inf")) != float("inf"):
            out[-1] += f" (PSNR {d['psnr']:.1f} dB)"
    if "features" in d:
        out.append("features exact" if d["features"] == 0 else f"features {d['features']:.2e}")
    return ", ".join(out) or "—"


def table(rows: list[Row], header: str, notes: list[str]) -> str:
    plain = {r.case: r for r in rows if r.variant == "plain" and r.status == "ok"}
    lines = [header, "",
             ("| backbone | row | status | build s | warm-up s | s / image | images/s | × plain | GPU GiB at start | "
              "after load | peak warm-up | peak timed | peak − plain's | max abs diff vs reference | graphs |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = plain.get(r.case)
        ok = r.status == "ok" and p is not None
        ratio = r.images_per_s / p.images_per_s if ok else float("nan")
        extra = r.peak_gib - p.peak_gib if ok else float("nan")
        lines.append(f"| {r.backbone} | {VARIANTS[r.variant].label} | {r.status} | {fmt(r.build_s, '.1f')} | "
                     f"{fmt(r.warmup_s, '.1f')} | {fmt(r.batch_s / r.batch if r.batch else float('nan'))} | "
                     f"{fmt(r.images_per_s, '.2f')} | {fmt(ratio)} | {fmt(r.start_gib, '.2f')} | "
                     f"{fmt(r.loaded_gib, '.2f')} | {fmt(r.warmup_peak_gib, '.2f')} | {fmt(r.peak_gib, '.2f')} | "
                     f"{fmt(extra, '+.2f')} | {diff_text(r.diff)} | {'—' if r.graphs is None else r.graphs} |")
    return "\n".join(lines + [""] + notes)


def planned(cases: list[str], only: set[str] | None, smoke: bool = False) -> list[tuple[str, str]]:
    """(case, variant) in run order; --only picks from every row of a case (also with --smoke) and keeps the
    plain call (every row's reference)."""
    table = SMOKE_ROWS if smoke and only is None else CASE_ROWS
    return [(c, k) for c in CASES if c in cases for k in table[c] if only is None or k in only or k == "plain"]


def main(argv: list[str] | None = None) -> list[Row]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--smoke", action="store_true", help="toy sizes, 2 steps, aot_eager, 1 timed batch: seconds")
    ap.add_argument("--preflight-only", action="store_true", help="print the pre-flight line and stop")
    ap.add_argument("--repeats", type=int, default=3, help="timed batches per row after the warm-up")
    ap.add_argument("--batch", type=int, default=2, help="images per batch at 1024² (the toy: 16)")
    ap.add_argument("--steps", type=int, default=28, help="sampling steps at 1024²")
    ap.add_argument("--flux-blocks", default="2,4", help="double,single blocks of the 1024² transformer")
    ap.add_argument("--backend", help="torch.compile backend (default: inductor; aot_eager with --smoke)")
    ap.add_argument("--budget-s", type=float, default=540.0,
                    help="a row starts only if its estimate fits in what is left; the rest are skipped and listed")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    ap.add_argument("--only", help="comma-separated rows to run (plain always runs), from: " + ", ".join(VARIANTS))
    ap.add_argument("--md", help="also write the table here (default: $OUT/gpu_check.md when OUT is set)")
    args = ap.parse_args(argv)
    start = time.monotonic()
    deadline = start + args.budget_s
    backend = args.backend or ("aot_eager" if args.smoke else "inductor")
    pf = preflight(args.device, backend)
    print(pf.line, flush=True)
    if pf.fatal:
        sys.exit(2)
    if args.preflight_only:
        return []
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    repeats = 1 if args.smoke else args.repeats
    only = set(args.only.split(",")) if args.only else None
    if only and not only <= set(VARIANTS):
        sys.exit(f"unknown rows {sorted(only - set(VARIANTS))}; known: {', '.join(VARIANTS)}")
    cases = args.cases.split(",")
    if not set(cases) <= set(MAKERS):
        sys.exit(f"unknown cases {sorted(set(cases) - set(MAKERS))}; known: {', '.join(MAKERS)}")
    try:
        blocks = tuple(int(x) for x in args.flux_blocks.split(","))
        assert len(blocks) == 2 and min(blocks) >= 1
    except (ValueError, AssertionError):
        sys.exit(f"--flux-blocks {args.flux_blocks}: expected two positive counts, double,single")
    target = args.md or (str(Path(os.environ["OUT"]) / "gpu_check.md") if os.environ.get("OUT") else None)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.init()  # the caching allocator exists before the first row reads and resets its counters
    dev = torch.cuda.get_device_name(args.device) if cuda else platform.processor() or platform.machine()
    notes: list[str] = []

    def write(rows: list[Row], done: bool) -> str:
        """The table so far; rewritten after every row, so a run killed at its time limit still leaves its rows."""
        header = (f"GPU check on {dev} ({args.device}), torch {torch.__version__}, "
                  f"{str(dtype).removeprefix('torch.')}, "
                  f"compile backend {backend}, {repeats} timed batch(es) per row after 1 warm-up, budget "
                  f"{args.budget_s:.0f} s; wall {time.monotonic() - start:.0f} s{'' if done else ' (unfinished)'}")
        skipped = [f"{r.backbone}: {r.variant}" for r in rows if r.status.startswith("skipped")]
        md = table(rows, header, [pf.line, ""] + notes + ([f"Skipped: {'; '.join(skipped)}."] if skipped else []))
        if target:
            Path(target).write_text(md + "\n")
        return md

    def progress(row: Row) -> None:
        print(f"[{time.monotonic() - start:6.1f} s] {row.backbone}: {row.variant}: {row.status}", file=sys.stderr,
              flush=True)

    rows: list[Row] = []
    built: dict[str, Case | None] = {}
    refs: dict[str, dict] = {c: {} for c in CASES}
    for key, variant in planned(cases, only, args.smoke):
        v = VARIANTS[variant]
        missing = [p for p in v.needs if p in pf.skip]
        if v.cuda_only and not cuda:
            why = f"needs CUDA ({v.cuda_only})"
        elif missing:
            why = "; ".join(pf.skip[p] for p in missing)
        elif time.monotonic() >= deadline:
            why = f"past the {args.budget_s:.0f} s budget"
        else:
            why = ""
        if not why and key not in built:  # built when its first row runs: a case the budget skips costs nothing
            t0 = time.monotonic()
            try:
                built[key] = MAKERS[key](dtype, args.device, args.smoke, args.batch, args.steps, blocks)
                notes.append(f"- {built[key].about}; built in {time.monotonic() - t0:.0f} s")
            except Exception as e:  # noqa: BLE001 — reported in the table, the other backbone still runs
                traceback.print_exc()
                built[key] = None
                notes.append(f"- {key}: FAILED to build: {one_line(e)}")
        case = built.get(key)
        name = case_name(key, args.smoke)
        if not why and case is None:
            why = "the backbone failed to build"
        if not why:
            plain = next((r for r in rows if r.case == key and r.variant == "plain" and r.status == "ok"), None)
            last_build = next((r.build_s for r in reversed(rows) if r.case == key and r.status == "ok"), float("nan"))
            need = estimate(v, plain.batch_s if plain else float("nan"), last_build, repeats, backend)
            left = deadline - time.monotonic()
            if need > left:
                why = f"{max(left, 0):.0f} s of the {args.budget_s:.0f} s budget left, the row needs about {need:.0f} s"
        if why:
            row = Row(key, name, variant, status=f"skipped: {why}")
        else:
            try:
                row = run_row(case, variant, args.device, backend, repeats, refs[key], deadline)
            except Exception as e:  # noqa: BLE001 — one failing row must not stop the others
                traceback.print_exc()
                row = Row(key, name, variant, status=f"FAILED: {one_line(e)}")
                torch._dynamo.reset()
            free(args.device)
        rows.append(row)
        progress(row)
        write(rows, done=False)
    print(write(rows, done=True))
    return rows


if __name__ == "__main__":
    main()
