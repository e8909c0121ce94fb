"""GPU check: eager vs compiled capture, each offload mode, fp8 / int8 storage, peak memory and images/s, in one command.

Meant for one H200 and at most 10 minutes, with no network (no downloads: the toy backbone ships in the package
and the 1024² backbone is built from a config with random weights):

    python bench/gpu_check.py                           # CUDA, bfloat16; prints a markdown table
    python bench/gpu_check.py --smoke --device cpu      # the same rows at toy sizes, aot_eager: seconds

Two backbones: the embedded toy (64×64, 24 steps, true CFG 5) with its shipped heads' capture spec, and a tiny
FLUX-architecture transformer at 1024² (4 096 image + 512 text tokens, as FLUX.1-dev; width 1024, 4 double and
8 single blocks, 8× VAE) with paper sigmas and the seg concepts. For each, rows: a plain pipeline call (the same
images without capture), `generate` with capture in eager mode (the reference), compiled by blocks and as a whole
transformer (inductor), with each offload mode (model / sequential / group), with fp8 and int8 storage, and
compiled by blocks over group offload and over fp8 storage (graphs broken where their hooks move weights).
Each row builds its backbone afresh, warms it up once, then times `--repeats` batches (median). Columns: time per
batch, images/s and its ratio to the plain call, GPU memory held after loading and the peak while generating
(`torch.cuda.max_memory_allocated`), and the largest difference from the eager reference (images in 0–1,
features; fp8 / int8 rows also give the image PSNR). A row that fails is reported in the table, with the
error, and the rest still run; rows past `--budget-s` are reported as skipped. The table is also written to
$OUT/gpu_check.md when OUT is set (or to --md), after every row, so a run killed at its time limit keeps its rows.
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch._dynamo

from mmdiff_gen.backbones import load_backbone, wrap_pipeline
from mmdiff_gen.backbones.loading import DEFAULT_HEADS
from mmdiff_gen.backbones.runtime import apply_runtime
from mmdiff_gen.backbones.tiny import build_tiny_flux
from mmdiff_gen.capture import CaptureSpec, compile_backbone, compiled_graphs, generate, plan_schedule
from mmdiff_gen.capture._noise import generators_for
from mmdiff_gen.tasks import get as get_task
from mmdiff_gen.jobs.annotate import Annotator, head_files
from mmdiff_gen.toy.world import render_scene

# The 1024² backbone: FLUX.1-dev's token geometry (8× VAE, 2×2 packing → 64×64 image tokens; 512 text tokens)
# at a width and depth that build in seconds (≈ 0.3 B transformer parameters).
FLUX_1024 = dict(dim_head=128, heads=8, double_blocks=4, single_blocks=8, text_width=256, text_layers=2,
                 vae_channels=(32, 64, 128, 128), t5_max_length=512)
SMOKE_TINY = dict(double_blocks=1, single_blocks=1, text_layers=1)  # fewer ops: quick aot_eager warm-ups

# name → (offload, storage, compile mode); "plain" is a pipeline call without capture. Eager first: the reference.
VARIANTS: dict[str, tuple[str, str, str | None]] = {
    "eager": ("none", "full", None),
    "plain": ("none", "full", None),
    "compile blocks": ("none", "full", "blocks"),
    "offload model": ("model", "full", None),
    "offload group": ("group", "full", None),
    "offload sequential": ("sequential", "full", None),
    "fp8 storage": ("none", "fp8", None),
    "int8 storage": ("none", "int8", None),
    "compile blocks + offload group": ("group", "full", "blocks"),  # graph breaks where the hooks move weights
    "compile blocks + fp8 storage": ("none", "fp8", "blocks"),
    "compile transformer": ("none", "full", "transformer"),  # last: the longest warm-up
}
LABELS = {"plain": "plain pipeline call (no capture)", "eager": "`generate`, eager capture (reference)",
          "compile blocks": '`compile_backbone(bb, "blocks")`', "compile transformer": '`compile_backbone(bb, "transformer")`',
          "offload model": "`offload=\"model\"`", "offload group": "`offload=\"group\"` (leaf level, CUDA stream)",
          "offload sequential": "`offload=\"sequential\"`", "fp8 storage": "`storage=\"fp8\"` (layerwise casting)",
          "int8 storage": "`storage=\"int8\"` (torchao weight-only)",
          "compile blocks + offload group": "compiled by blocks, `offload=\"group\"`",
          "compile blocks + fp8 storage": "compiled by blocks, `storage=\"fp8\"`"}

# --smoke keeps a few rows, each path once (on the CPU, offload="model" of the toy is refused: a FAILED row).
SMOKE_VARIANTS = {"toy": ("eager", "offload model", "fp8 storage"),
                  "flux1024": ("eager", "plain", "compile blocks", "offload group")}


@dataclass
class Case:
    """One backbone: how to build it for a variant, what to capture, how to sample."""

    name: str
    build: Callable[[str, str], Any]  # (offload, storage) → Backbone
    spec: CaptureSpec
    kw: dict
    prompts: list[str]
    variants: tuple[str, ...] = tuple(VARIANTS)


@dataclass
class Row:
    case: str
    variant: str
    status: str = "ok"
    warmup_s: float = float("nan")
    batch_s: float = float("nan")
    images_per_s: float = float("nan")
    loaded_gib: float = float("nan")
    peak_gib: float = float("nan")
    graphs: int | None = None
    diff: dict = field(default_factory=dict)


def toy_case(dtype: torch.dtype, device: str, smoke: bool) -> Case:
    def build(offload: str, storage: str):
        return load_backbone("toy", dtype=dtype, device=device, offload=offload, storage=storage)

    bb = load_backbone("toy", dtype=dtype, device="cpu")
    spec = Annotator(head_files(Path(DEFAULT_HEADS["toy"]), ["seg", "saliency", "depth"]), bb.identity()).spec()
    kw = bb.sampling_kwargs(num_inference_steps=2 if smoke else None)
    batch = 2 if smoke else 16
    prompts = [render_scene(9_200_000 + i).caption for i in range(batch)]
    variants = SMOKE_VARIANTS["toy"] if smoke else tuple(VARIANTS)
    return Case("toy (64×64, 24 steps, true CFG 5)" if not smoke else "toy (smoke)", build, spec, kw, prompts, variants)


def flux_1024_case(dtype: torch.dtype, device: str, smoke: bool) -> Case:
    base = build_tiny_flux(seed=0, **(SMOKE_TINY if smoke else FLUX_1024))
    if dtype != torch.float32:
        base.to(dtype=dtype)

    def build(offload: str, storage: str):
        pipe = copy.deepcopy(base)  # on the CPU: every variant starts from the same weights, nothing moved yet
        apply_runtime(pipe, offload=offload, storage=storage, dtype=dtype, device=device)
        return wrap_pipeline(pipe, "tiny-flux-1024")

    size = 64 if smoke else 1024
    kw = dict(height=size, width=size, num_inference_steps=2 if smoke else 28, guidance_scale=3.5,
              max_sequence_length=32 if smoke else 512)
    spec = CaptureSpec(concepts=get_task("seg").concepts, layers=(0,) if smoke else None)
    prompts = ["a large red circle on the left", "a small blue star in the center"]
    name = "tiny FLUX (smoke)" if smoke else "tiny FLUX 1024² (28 steps, width 1024, 4+8 blocks, random weights)"
    return Case(name, build, spec, kw, prompts, SMOKE_VARIANTS["flux1024"] if smoke else tuple(VARIANTS))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_once(bb, case: Case, plain: bool, device: str):
    """(seconds, images (B, H, W, 3) float 0–1, features or None)."""
    seeds = list(range(len(case.prompts)))
    sync(device)
    t0 = time.perf_counter()
    if plain:  # the same contract schedule generate follows, so the images match
        plan = plan_schedule(bb, case.spec, case.kw["num_inference_steps"], case.kw["height"], case.kw["width"])
        images = bb.pipe(prompt=case.prompts, generator=generators_for(seeds), sigmas=list(plan.pipeline_sigmas),
                         output_type="np", **case.kw).images
        feats = None
    else:
        gen = generate(bb, case.prompts, case.spec, seeds=seeds, output_type="np", **case.kw)
        images, feats = gen.images, gen.capture.features
    sync(device)
    return time.perf_counter() - t0, np.asarray(images, dtype=np.float32), feats


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def gib(x: int) -> float:
    return x / 2**30


def free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def run_row(case: Case, variant: str, device: str, backend: str, repeats: int, ref: dict, deadline: float) -> Row:
    offload, storage, mode = VARIANTS[variant]
    row = Row(case.name, variant)
    cuda = device.startswith("cuda")
    free(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    bb = case.build(offload, storage)
    if cuda:
        row.loaded_gib = gib(torch.cuda.memory_allocated())
    if mode is not None:
        torch._dynamo.reset()
        before = compiled_graphs()
        compile_backbone(bb, mode, backend=backend)
    plain = variant == "plain"
    row.warmup_s, images, feats = run_once(bb, case, plain, device)
    if mode is not None:
        row.graphs = compiled_graphs() - before
    if variant == "eager":
        ref.update(images=images, features=feats.float().cpu())
    if "images" in ref:
        row.diff["images"] = float(np.abs(images - ref["images"]).max())
        if storage != "full":
            row.diff["psnr"] = psnr(images, ref["images"])
        if feats is not None:
            row.diff["features"] = float((feats.float().cpu() - ref["features"]).abs().max())
    if cuda:
        torch.cuda.reset_peak_memory_stats()  # the peak of timed batches: weights held + activations
    times = []
    for _ in range(repeats):
        if times and time.monotonic() + times[-1] > deadline:
            break  # keep the whole check inside its budget
        times.append(run_once(bb, case, plain, device)[0])
    if mode is not None and row.graphs is not None:
        row.graphs = compiled_graphs() - before  # later identical batches must build nothing more
    row.batch_s = statistics.median(times)
    row.images_per_s = len(case.prompts) / row.batch_s
    if cuda:
        row.peak_gib = gib(torch.cuda.max_memory_allocated())
    del bb
    if mode is not None:
        torch._dynamo.reset()  # the next row starts from no compiled code
    return row


def one_line(e: Exception) -> str:
    """An error as one table cell."""
    msg = (str(e).strip().splitlines() or [""])[0][:160].replace("|", "/")
    return f"{type(e).__name__}: {msg}"


def fmt(x: float, spec: str = ".3f") -> str:
    return "—" if math.isnan(x) else format(x, spec)


def diff_text(d: dict) -> str:
    if not d:
        return "—"
    out = "exact" if d.get("images") == 0 else f"images {d['images']:.2e}"
    if "psnr" in d:
        out += f" (PSNR {d['psnr']:.1f} dB)" if d["psnr"] != float("inf") else ""
    if "features" in d:
        out += ", features exact" if d["features"] == 0 else f", features {d['features']:.2e}"
    return out


def table(rows: list[Row], header: str) -> str:
    plain = {r.case: r.images_per_s for r in rows if r.variant == "plain" and r.status == "ok"}
    lines = [header, "",
             ("| backbone | variant | status | warm-up s | s / batch (median) | images/s | × plain | GPU GiB after load | "
              "peak GPU GiB | max abs diff vs eager | graphs |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r.images_per_s / plain[r.case] if r.case in plain and r.status == "ok" else float("nan")
        lines.append(f"| {r.case} | {LABELS[r.variant]} | {r.status} | {fmt(r.warmup_s, '.1f')} | {fmt(r.batch_s)} | "
                     f"{fmt(r.images_per_s, '.2f')} | {fmt(ratio)} | {fmt(r.loaded_gib, '.2f')} | "
                     f"{fmt(r.peak_gib, '.2f')} | {diff_text(r.diff)} | {'—' if r.graphs is None else r.graphs} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Row]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--smoke", action="store_true", help="toy sizes, 2 steps, aot_eager, 1 timed batch: seconds")
    ap.add_argument("--repeats", type=int, default=3, help="timed batches per row after the warm-up")
    ap.add_argument("--backend", help="torch.compile backend (default: inductor; aot_eager with --smoke)")
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="rows not started by then are skipped (the last one started may take a minute or two more)")
    ap.add_argument("--cases", default="toy,flux1024", help="comma-separated: toy, flux1024")
    ap.add_argument("--only", help="comma-separated variants to run, from: " + ", ".join(VARIANTS))
    ap.add_argument("--md", help="also write the table here (default: $OUT/gpu_check.md when OUT is set)")
    args = ap.parse_args(argv)
    start = time.monotonic()
    deadline = start + args.budget_s
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"--device {args.device}: no CUDA device here (run with --smoke --device cpu on a CPU)")
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    backend = args.backend or ("aot_eager" if args.smoke else "inductor")
    repeats = 1 if args.smoke else args.repeats
    only = set(args.only.split(",")) if args.only else None
    if only and not only <= set(VARIANTS):
        sys.exit(f"unknown variants {sorted(only - set(VARIANTS))}; known: {', '.join(VARIANTS)}")
    makers = {"toy": toy_case, "flux1024": flux_1024_case}
    cases = args.cases.split(",")
    if not set(cases) <= set(makers):
        sys.exit(f"unknown cases {sorted(set(cases) - set(makers))}; known: {', '.join(makers)}")
    target = args.md or (str(Path(os.environ["OUT"]) / "gpu_check.md") if os.environ.get("OUT") else None)
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine()

    def write(rows: list[Row], done: bool) -> str:
        """The table so far; rewritten after every row, so a run killed at its time limit still leaves its rows."""
        header = (f"GPU check on {dev} ({args.device}), torch {torch.__version__}, {str(dtype).removeprefix('torch.')}, "
                  f"compile backend {backend}, {repeats} timed batch(es) per row after 1 warm-up; "
                  f"wall {time.monotonic() - start:.0f} s{'' if done else ' (unfinished)'}")
        md = table(rows, header)
        if target:
            Path(target).write_text(md + "\n")
        return md

    rows: list[Row] = []
    for key in cases:
        try:
            case = makers[key](dtype, args.device, args.smoke)
        except Exception as e:  # noqa: BLE001 — reported in the table, the other backbone still runs
            traceback.print_exc()
            rows.append(Row(key, "eager", status=f"FAILED to build: {one_line(e)}"))
            continue
        ref: dict = {}
        # --only picks from every variant (also with --smoke); eager always runs: it is every diff's reference
        variants = [v for v in VARIANTS if v in only or v == "eager"] if only else case.variants
        for variant in variants:
            if time.monotonic() > deadline:
                rows.append(Row(case.name, variant, status=f"skipped (past the {args.budget_s:.0f} s budget)"))
                continue
            try:
                rows.append(run_row(case, variant, args.device, backend, repeats, ref, deadline))
            except Exception as e:  # noqa: BLE001 — one failing row must not stop the others
                traceback.print_exc()
                rows.append(Row(case.name, variant, status=f"FAILED: {one_line(e)}"))
                torch._dynamo.reset()
            free(args.device)
            print(f"[{time.monotonic() - start:6.1f} s] {case.name}: {variant}: {rows[-1].status}", file=sys.stderr,
                  flush=True)
            write(rows, done=False)
    print(write(rows, done=True))
    return rows


if __name__ == "__main__":
    main()
