"""Compiled capture vs eager: time per batch, warm-up (compile) time, graphs built, and equality of the results.

One command, one run, on the embedded toy backbone with the capture spec of its shipped heads:

    python bench/compile_capture.py [--batch 8] [--repeats 5] [--backend inductor] [--json out.json]
    python bench/compile_capture.py --smoke     # tiny random FLUX, aot_eager, 1 timed batch: seconds

Three copies of the backbone run the same batch (same prompts and seeds): eager, `compile_backbone(bb, "blocks")`
(diffusers' regional compilation) and `compile_backbone(bb, "transformer")` (one fullgraph forward). The first
call of a compiled copy is its warm-up (tracing and code generation); after every copy is warm, timed batches
are interleaved so drifts in machine load hit every variant alike, and the median is reported. Equality: the
largest absolute difference from eager of the images (0–1 floats), the features and the concept maps.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch._dynamo

from mmdiff_gen.backbones import load_backbone, wrap_pipeline
from mmdiff_gen.backbones.loading import DEFAULT_HEADS
from mmdiff_gen.backbones.tiny import build_tiny_flux
from mmdiff_gen.capture import CaptureSpec, compile_backbone, compiled_graphs, generate
from mmdiff_gen.jobs.annotate import Annotator, head_files
from mmdiff_gen.toy.world import render_scene

TASKS = ["seg", "saliency", "depth"]
MODES = ("blocks", "transformer")


def prompts(n: int) -> list[str]:
    return [render_scene(9_100_000 + i, 1 + i % 2).caption for i in range(n)]


def setup(smoke: bool):
    """(build() → a fresh backbone, capture spec, sampling kwargs, description, annotator or None)."""
    if smoke:
        spec = CaptureSpec(concepts=("object", "background"), layers=(0,), store_dtype="float32")
        kw = dict(height=64, width=64, num_inference_steps=3, max_sequence_length=32, true_cfg_scale=2.0,
                  negative_prompt="")
        tiny = dict(double_blocks=1, single_blocks=1, text_layers=1)  # fewer ops to trace: a faster warm-up
        return (lambda: wrap_pipeline(build_tiny_flux(seed=0, **tiny), "tiny")), spec, kw, "tiny random FLUX", None

    def build():
        return load_backbone("toy", dtype=torch.float32, device="cpu")

    bb = build()
    ann = Annotator(head_files(Path(DEFAULT_HEADS["toy"]), TASKS), bb.identity())
    # float32 storage: differences are not hidden (nor made) by rounding the features to bfloat16
    return build, ann.spec(store_dtype="float32"), bb.sampling_kwargs(), "toy backbone, shipped heads' spec", ann


def run(bb, texts, spec, kw):
    t0 = time.perf_counter()
    gen = generate(bb, texts, spec, seeds=list(range(len(texts))), output_type="np", **kw)
    return time.perf_counter() - t0, gen


def max_diff(a, b) -> float:
    if a is None or b is None:
        return float("nan")
    return float((torch.as_tensor(np.asarray(a)).float() - torch.as_tensor(np.asarray(b)).float()).abs().max())


def measure(smoke: bool, batch: int, repeats: int, backend: str) -> dict:
    build, spec, kw, what, ann = setup(smoke)
    texts = prompts(batch)
    torch._dynamo.reset()
    variants = {"eager": build()}
    ref_time, ref = run(variants["eager"], texts, spec, kw)  # eager warm-up (first call allocates, plans)
    rows = {"eager": {"warmup_s": ref_time, "graphs": 0}}
    for mode in MODES:
        bb = build()
        before = compiled_graphs()
        compile_backbone(bb, mode, backend=backend)
        warm_s, gen = run(bb, texts, spec, kw)
        rows[mode] = {"warmup_s": warm_s, "graphs": compiled_graphs() - before,
                      "max_abs_diff": {"images": max_diff(gen.images, ref.images),
                                       "features": max_diff(gen.capture.features, ref.capture.features),
                                       "concept_maps": max_diff(gen.capture.concept_maps, ref.capture.concept_maps)},
                      "scale": {"images": 1.0, "features": float(ref.capture.features.abs().max()),
                                "concept_maps": 1.0}}
        if ann is not None:  # what a dataset would record: the heads' labels of both passes
            size = (kw["height"], kw["width"])
            ours, theirs = ann(gen.capture, size).labels, ann(ref.capture, size).labels
            rows[mode]["seg_labels_equal"] = float((ours["seg"] == theirs["seg"]).float().mean())
        variants[mode] = bb
        print(f"{mode}: warm-up {warm_s:.1f} s, {rows[mode]['graphs']} graphs", file=sys.stderr, flush=True)
    print(f"timing {repeats} interleaved batches per variant…", file=sys.stderr, flush=True)
    after_warmup = compiled_graphs()
    times = {n: [] for n in variants}
    for _ in range(repeats):
        for name, bb in variants.items():  # interleaved
            times[name].append(run(bb, texts, spec, kw)[0])
    rebuilt = compiled_graphs() - after_warmup  # identical later batches must build nothing
    for name in variants:
        rows[name]["median_s"] = statistics.median(times[name])
        rows[name]["min_s"] = min(times[name])
        rows[name]["ratio"] = rows[name]["median_s"] / statistics.median(times["eager"])
    return {"what": what, "batch": batch, "repeats": repeats, "backend": backend, "sampling": kw,
            "spec": {"layers": spec.layers, "sigmas": spec.sigmas, "concepts": spec.concepts,
                     "cross_attention": spec.cross_attention},
            "graphs_after_warmup": rebuilt, "rows": rows}


def report(res: dict) -> str:
    kw = res["sampling"]
    lines = [(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
              f"torch {torch.__version__}; {res['what']}, {kw['height']}×{kw['width']}, {kw['num_inference_steps']} "
              f"steps, true CFG {kw.get('true_cfg_scale', 1.0)}; batch {res['batch']}, backend {res['backend']}; "
              f"median of {res['repeats']} interleaved batches after warm-up"),
             "",
             ("| variant | time per batch × eager (median) | median s | warm-up (first batch) s | graphs built | "
              "max abs diff vs eager: images / features (of max abs) / concept maps | seg labels equal |"),
             "|---|---|---|---|---|---|---|"]
    for name, r in res["rows"].items():
        d = r.get("max_abs_diff")
        diff = "—" if d is None else (f"{d['images']:.2e} / {d['features']:.2e} (of {r['scale']['features']:.1f}) / "
                                      f"{d['concept_maps']:.2e}")
        label = "eager `generate`" if name == "eager" else f'`compile_backbone(bb, "{name}")`'
        same = f"{r['seg_labels_equal'] * 100:.2f}%" if "seg_labels_equal" in r else "—"
        lines.append(f"| {label} | {r['ratio']:.3f} | {r['median_s']:.3f} | {r['warmup_s']:.1f} | {r['graphs']} | {diff} "
                     f"| {same} |")
    lines.append(f"\ngraphs built by the {res['repeats']} × {len(res['rows'])} batches after warm-up: "
                 f"{res['graphs_after_warmup']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny random FLUX, aot_eager backend, 1 timed batch: seconds")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)
    if args.smoke:
        args.batch, args.repeats, args.backend = 2, 1, "aot_eager"
    res = measure(args.smoke, args.batch, args.repeats, args.backend)
    print(report(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    return res


if __name__ == "__main__":
    main()
