"""Capture overhead: wall time and peak memory of generation with capture (± concepts) vs plain generation.

One command, one run, on the tiny FLUX-architecture pipeline of the tests (random weights):

    python bench/capture_overhead.py [--device cuda] [--steps 28] [--batch 4] [--repeats 7]
    python bench/capture_overhead.py --smoke     # 4 steps, batch 2, 1 repeat: seconds (tests/test_benches.py)

Every variant generates the same images (same prompts, seeds and contract schedule). Times are the
minimum (and median) of interleaved repeats: on a shared 2-core CPU the minimum is the stable figure,
since noise only ever adds time. Peak memory is the peak of live tensor bytes allocated during one generation,
weights excluded (CPU: counted by a dispatch mode, bench/_memory.py; CUDA: max_memory_allocated).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from mmdiff_gen.backbones import wrap_pipeline
from mmdiff_gen.backbones.tiny import build_tiny_flux
from mmdiff_gen.capture import CaptureSpec, generate, plan_schedule
from mmdiff_gen.capture._noise import generators_for
from mmdiff_gen.tasks import get as get_task

sys.path.insert(0, str(Path(__file__).parent))
from _memory import PeakTensorMemory  # noqa: E402

PROMPTS = ["a large red circle on the left", "a small blue star", "a green ring in the center", "a white cross"]

VARIANTS = {
    # name: spec or None for a plain pipeline call
    "plain": None,
    "capture (on-schedule sigmas)": CaptureSpec(sigmas=(0.78, 0.52, 0.26)),
    "capture (paper sigmas, +1 forward for 0.001)": CaptureSpec(),
    "capture + concepts (paper sigmas)": CaptureSpec(concepts=get_task("seg").concepts),
}


def run_variant(bb, name, steps, batch, device):
    spec = VARIANTS[name]
    prompts = (PROMPTS * batch)[:batch]
    seeds = list(range(batch))
    kw = dict(height=64, width=64, num_inference_steps=steps, max_sequence_length=32)
    if spec is None:
        plan = plan_schedule(bb, CaptureSpec(), steps, 64, 64)
        bb.pipe(prompt=prompts, generator=generators_for(seeds), sigmas=list(plan.pipeline_sigmas), **kw)
    else:
        generate(bb, prompts, spec, seeds=seeds, **kw)
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build(device):
    bb = wrap_pipeline(build_tiny_flux(seed=0), "tiny")
    bb.pipe.to(device)
    return bb


def peak_memory(bb, name, steps, batch, device) -> float:
    """MiB: peak of live tensors allocated during one generation (weights excluded)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run_variant(bb, name, steps, batch, device)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    weights = [t for m in bb.pipe.components.values() if isinstance(m, torch.nn.Module) for t in m.state_dict().values()]
    with PeakTensorMemory(existing=weights) as probe:
        run_variant(bb, name, steps, batch, device)
    return probe.peak / 2**20


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="4 steps, batch 2, 1 repeat: seconds")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps, args.batch, args.repeats = 4, 2, 1
    torch.set_num_threads(torch.get_num_threads())

    bb = build(args.device)
    names = list(VARIANTS)
    for n in names:  # warm-up
        run_variant(bb, n, args.steps, args.batch, args.device)
    times = {n: [] for n in names}
    for _ in range(args.repeats):
        for n in names:  # interleaved, so drifts in machine load hit every variant alike
            t0 = time.perf_counter()
            run_variant(bb, n, args.steps, args.batch, args.device)
            times[n].append(time.perf_counter() - t0)
    best = {n: min(v) for n, v in times.items()}
    med = {n: statistics.median(v) for n, v in times.items()}
    mem = {n: peak_memory(bb, n, args.steps, args.batch, args.device) for n in names}

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, device {args.device}")
    print(f"tiny FLUX pipeline, 64×64, {args.steps} steps, batch {args.batch}, {args.repeats} interleaved repeats")
    head = f"{'variant':46s} {'min s':>7s} {'× plain':>8s} {'median s':>9s} {'× plain':>8s} {'peak Δ MiB':>11s} {'× plain':>8s}"
    print(head)
    rows = {}
    for n in names:
        rows[n] = {
            "min_s": best[n], "time_ratio": best[n] / best["plain"],
            "median_s": med[n], "median_ratio": med[n] / med["plain"],
            "peak_mib": mem[n], "mem_ratio": mem[n] / max(mem["plain"], 1e-9),
        }
        r = rows[n]
        print(f"{n:46s} {r['min_s']:7.3f} {r['time_ratio']:8.3f} {r['median_s']:9.3f} {r['median_ratio']:8.3f} "
              f"{r['peak_mib']:11.1f} {r['mem_ratio']:8.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
