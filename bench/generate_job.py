"""The dataset job against its alternatives, on the embedded toy backbone and its shipped heads.

One command, one run:

    python bench/generate_job.py [--heads DIR] [--repeats 7] [--json out.json]
    python bench/generate_job.py --smoke     # 4 steps, batch 2, 1 repeat, 2 prompts: seconds (tests/test_benches.py)

(a) `generate` (seg + saliency + depth) vs plain FluxPipeline generation of the same images, split into
    backbone, capture, heads and writing time, with the transformer calls counted;
(b) vs the two-stage alternative: plain generation, then real-image extraction of the generated
    images and the same heads;
(c) images per second against batch size (the whole job: generation, heads, encoding, shards);
(d) peak resident memory of the job while the number of prompts grows tenfold (child processes);
(e) at FLUX.1-dev scale, by FLOP count on the meta device, the heads' share of a 28-step 1024² generation;
(f) the whole job with encoding and writing in the main thread vs on threads while the next batch generates:
    wall time against generation + heads, and the share of it spent waiting on the writer.

Times are minima of interleaved repeats (on a shared CPU, noise only ever adds time); medians are shown too.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mmdiff_gen.backbones import load_backbone
from mmdiff_gen.backbones.loading import DEFAULT_HEADS
from mmdiff_gen.capture import extract, generate, plan_schedule
from mmdiff_gen.capture._noise import generators_for
from mmdiff_gen.io.shards import ShardWriter
from mmdiff_gen.jobs.annotate import Annotator, head_files
from mmdiff_gen.io.members import encode_sample
from mmdiff_gen.jobs.dataset_job import GenerateJob, run_generate
from mmdiff_gen.jobs.plan import plan_samples
from mmdiff_gen.toy.world import render_scene

TASKS = ["seg", "saliency", "depth"]


def prompts(n: int) -> list[str]:
    return [render_scene(9_000_000 + i, 1 + i % 2).caption for i in range(n)]


class CallCounter:
    """Counts transformer forwards (true CFG calls it twice per step)."""

    def __init__(self, transformer):
        self.calls = 0
        self.handle = transformer.register_forward_pre_hook(self._count)

    def _count(self, *_):
        self.calls += 1


def settings(bb, steps: int | None = None) -> dict:
    """The toy's recommended sampling kwargs (true CFG 5 with an empty negative prompt); `steps` overrides its 24."""
    return bb.sampling_kwargs(num_inference_steps=steps)


def plain(bb, ann, texts, seeds, kw, _out):
    plan = plan_schedule(bb, ann.spec(), kw["num_inference_steps"], kw["height"], kw["width"])
    t0 = time.perf_counter()
    images = bb.pipe(prompt=texts, generator=generators_for(seeds),
                     sigmas=list(plan.pipeline_sigmas), **kw).images
    return {"backbone": time.perf_counter() - t0}, images


def _write(ann, texts, images, annotation, cap, out):
    """Encode and write one shard, as the job does."""
    with ShardWriter(out, 0, "webdataset") as w:
        for i, s in enumerate(plan_samples(texts, 1, 0)):
            lab = {t: v[i].numpy() for t, v in annotation.labels.items()}
            meta = {"key": s.key, "seed": s.seed, "sigmas": [float(x) for x in cap.sigmas[i]],
                    "quality": annotation.quality[i]}
            w.write(s.key, encode_sample(np.asarray(images[i]), s.prompt, meta, lab, image_format="jpg",
                                         classes=ann.classes))
        w.commit({"written": len(texts)})


def ours(bb, ann, texts, seeds, kw, out):
    t0 = time.perf_counter()
    gen = generate(bb, texts, ann.spec(), seeds=seeds, **kw)
    t1 = time.perf_counter()
    labels = ann(gen.capture, (kw["height"], kw["width"]))
    t2 = time.perf_counter()
    _write(ann, texts, gen.images, labels, gen.capture, out)
    return {"generate": t1 - t0, "heads": t2 - t1, "write": time.perf_counter() - t2}, gen.images


def two_stage(bb, ann, texts, seeds, kw, out):
    times, images = plain(bb, ann, texts, seeds, kw, out)
    t1 = time.perf_counter()
    cap = extract(bb, images, ann.spec(), captions=texts, seeds=seeds, guidance_scale=kw["guidance_scale"],
                  max_sequence_length=kw["max_sequence_length"])
    t2 = time.perf_counter()
    labels = ann(cap, (kw["height"], kw["width"]))
    t3 = time.perf_counter()
    _write(ann, texts, images, labels, cap, out)
    times.update({"extract": t2 - t1, "heads": t3 - t2, "write": time.perf_counter() - t3})
    return times, images


def compare(bb, ann, batch: int, repeats: int, steps: int | None = None) -> dict:
    kw = settings(bb, steps)
    texts, seeds = prompts(batch), list(range(batch))
    variants = {"plain": plain, "generate (ours)": ours, "two-stage": two_stage}
    counter = CallCounter(bb.transformer)
    calls = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in variants.items():  # warm-up, and the transformer calls of each variant
            counter.calls = 0
            fn(bb, ann, texts, seeds, kw, Path(tmp))
            calls[name] = counter.calls
        runs = {n: [] for n in variants}
        for _ in range(repeats):
            for name, fn in variants.items():  # interleaved: load drifts hit every variant alike
                t0 = time.perf_counter()
                stages, _ = fn(bb, ann, texts, seeds, kw, Path(tmp))
                runs[name].append({"total": time.perf_counter() - t0, **stages})
    counter.handle.remove()
    best = {n: {k: min(r[k] for r in rs) for k in rs[0]} for n, rs in runs.items()}
    med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in runs.items()}
    return {"best": best, "median": med, "calls": calls, "steps": kw["num_inference_steps"]}


def throughput(bb, ann, batches: list[int], n: int, steps: int | None = None) -> dict:
    kw = settings(bb, steps)
    texts = prompts(n)
    out = {}
    for b in batches:
        with tempfile.TemporaryDirectory() as tmp:
            job = GenerateJob(out=Path(tmp) / "ds", tasks=tuple(TASKS), batch_size=b, shard_size=n, **kw)
            run_generate(bb, ann, texts[:b], job, progress=False)  # warm-up at this batch size
            job = GenerateJob(out=Path(tmp) / "ds2", tasks=tuple(TASKS), batch_size=b, shard_size=n, **kw)
            t0 = time.perf_counter()
            run_generate(bb, ann, texts, job, progress=False)
            out[b] = n / (time.perf_counter() - t0)
    return out


def pipelining(bb, ann, n: int, batch: int, steps: int | None = None) -> dict:
    """(f) The whole job with encoding and writing in the main thread (0 workers) vs on 2 threads while the next
    batch generates: wall time against the generation + heads time, and the share of it spent waiting on the
    writer (the GPU's idle share on a GPU node). 4 samples per prompt, as datasets are made."""
    kw = settings(bb, steps)
    texts = prompts(max(1, n // 4))
    out = {}
    for workers in (0, 2, 0, 2):  # interleaved: the second of each is kept (the first warms caches up)
        with tempfile.TemporaryDirectory() as tmp:
            job = GenerateJob(out=Path(tmp) / "ds", tasks=tuple(TASKS), images_per_prompt=4, batch_size=batch,
                              shard_size=max(1, n // 2), write_workers=workers, **kw)
            t0 = time.perf_counter()
            rep = run_generate(bb, ann, texts, job, progress=False)
            wall = time.perf_counter() - t0
        busy = rep.seconds.get("backbone", 0.0) + rep.seconds.get("heads", 0.0)
        out[workers] = {"wall_s": wall, "generate_and_heads_s": busy, "write_wait_s": rep.seconds.get("write", 0.0),
                        "overhead": wall / busy - 1, "idle_share": rep.seconds.get("write", 0.0) / wall}
    return out


def writer_at_1024(batches: int = 4, batch: int = 4, gpu_s: float = 1.0) -> dict:
    """(f') The writer alone at FLUX.1-dev's 1024²: a GPU that spends `gpu_s` per batch is stood in for by a
    sleep (the host thread is as free as it is while it waits for CUDA); the members are a photo-like JPEG, a
    seg map, a saliency map and a noisy depth map. The share of wall time the 'GPU' waits on the writer."""
    from mmdiff_gen.io.shards import PipelinedWriter

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:1024, 0:1024]
    image = np.clip(128 + 60 * np.sin(xx / 37.0)[..., None] + rng.normal(0, 12, (1024, 1024, 3)), 0, 255).astype(np.uint8)
    labels = {"seg": ((xx // 128 + yy // 128) % 21).astype(np.uint8),
              "saliency": np.clip(255 * np.exp(-((xx - 512) ** 2 + (yy - 512) ** 2) / 1e5), 0, 255).astype(np.uint8),
              "depth": (2 + yy / 300 + rng.normal(0, 0.05, (1024, 1024))).astype(np.float32)}
    classes = [str(i) for i in range(21)]
    out = {}
    for workers in (0, 2):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            with ShardWriter(Path(tmp), 0, "webdataset") as w, PipelinedWriter(
                    w, lambda x: encode_sample(*x, image_format="jpg", classes=classes), workers=workers,
                    max_pending=2 * batch) as pipe:
                for b in range(batches):
                    time.sleep(gpu_s)  # the GPU generating batch b
                    for i in range(batch):
                        pipe.put(f"{b * batch + i:09d}", (image, "a prompt", {"key": b * batch + i}, labels),
                                 on_error=print)
                pipe.finish()
                w.commit({})
            wall = time.perf_counter() - t0
        out[workers] = {"wall_s": wall, "gpu_s": batches * gpu_s, "idle_share": 1 - batches * gpu_s / wall}
    return out


def memory_child(n: int, heads: str, steps: int | None = None) -> None:
    """Run the whole job on n prompts and print the peak RSS in MiB (called in a fresh process)."""
    bb = load_backbone("toy", dtype=torch.float32, device="cpu")
    ann = Annotator(head_files(Path(heads), TASKS), bb.identity())
    with tempfile.TemporaryDirectory() as tmp:
        job = GenerateJob(out=Path(tmp), tasks=tuple(TASKS), batch_size=8, shard_size=64, **settings(bb, steps))
        run_generate(bb, ann, prompts(n), job, progress=False)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def memory(heads: str, sizes: list[int], steps: int | None = None) -> dict:
    out = {}
    for n in sizes:
        res = subprocess.run([sys.executable, __file__, "--memory-child", str(n), "--heads", heads]
                             + (["--steps", str(steps)] if steps else []),
                             capture_output=True, text=True, check=True)
        out[n] = float(res.stdout.strip().splitlines()[-1])
    return out


def flux_flops() -> dict:
    """FLOPs of FLUX.1-dev's transformer at 1024² (28 steps + 1 extra forward, text padded to 512) vs the three heads at
    FLUX widths, and vs one unified head serving all three (one aggregation, a decoder per task: MMDiff App. C)."""
    from mmdiff_gen.backbones import FluxBackbone
    from mmdiff_gen.backbones.flops import config_backbone
    from mmdiff_gen.backbones.flux import FLUX_DEV
    from mmdiff_gen.jobs.cost import generation_cost

    flux = config_backbone(FluxBackbone, "FluxTransformer2DModel", FLUX_DEV, vae_scale_factor=8, name="FLUX.1-dev")
    # Guidance-distilled: one call per step.
    return generation_cost(flux, size=1024, steps=28, rows_per_step=1, text_tokens=512, tasks=tuple(TASKS))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="4 steps, batch 2, 1 repeat, 2 prompts: seconds")
    ap.add_argument("--steps", type=int, help="sampling steps (default: the toy's own)")
    ap.add_argument("--heads", default=str(DEFAULT_HEADS["toy"]))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--throughput-n", type=int, default=32)
    ap.add_argument("--memory", default="16,160", help="prompt counts for the memory comparison")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.smoke:
        args.batch, args.repeats, args.batches, args.throughput_n, args.memory, args.steps = 2, 1, "2", 2, "2", 4
    if args.memory_child:
        return memory_child(args.memory_child, args.heads, args.steps)

    bb = load_backbone("toy", dtype=torch.float32, device="cpu")
    ann = Annotator(head_files(Path(args.heads), TASKS), bb.identity())
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; toy backbone, {settings(bb, args.steps)}")

    cmp = compare(bb, ann, args.batch, args.repeats, args.steps)
    b, m = cmp["best"], cmp["median"]
    base = b["plain"]["total"]
    print(f"\n(a, b) batch {args.batch}, min (median) of {args.repeats} interleaved repeats; transformer calls per batch")
    for name in b:
        print(f"  {name:18s} total {b[name]['total']:.3f} s ({m[name]['total']:.3f}) = {b[name]['total'] / base:.3f}× plain"
              f" (median {m[name]['total'] / m['plain']['total']:.3f}×); calls {cmp['calls'][name]}; "
              + ", ".join(f"{k} {v:.3f}" for k, v in b[name].items() if k != "total"))
    ours_wo_heads = b["generate (ours)"]["total"] - b["generate (ours)"]["heads"]
    ours_wo_heads_med = m["generate (ours)"]["total"] - m["generate (ours)"]["heads"]
    print(f"  ours without the heads' compute: {ours_wo_heads / base:.3f}× plain "
          f"(median {ours_wo_heads_med / m['plain']['total']:.3f}×); goal ≤ 1.05")
    print(f"  capture (generate − plain): {(b['generate (ours)']['generate'] - base) / base * 100:.1f}% of plain")
    print(f"  two-stage / ours: {b['two-stage']['total'] / b['generate (ours)']['total']:.3f}× "
          f"(median {m['two-stage']['total'] / m['generate (ours)']['total']:.3f}×)")

    batches = [int(x) for x in args.batches.split(",")]
    tp = throughput(bb, ann, batches, args.throughput_n, args.steps)
    print(f"\n(c) images/s, whole job, {args.throughput_n} prompts:", ", ".join(f"batch {k}: {v:.2f}" for k, v in tp.items()))

    sizes = [int(x) for x in args.memory.split(",")]
    mem = memory(args.heads, sizes, args.steps)
    print("(d) peak RSS:", ", ".join(f"{n} prompts: {v:.0f} MiB" for n, v in mem.items()),
          f"→ ratio {mem[sizes[-1]] / mem[sizes[0]]:.3f}")

    pipe = pipelining(bb, ann, args.throughput_n, args.batch, args.steps)
    print(f"(f) whole job, {args.throughput_n} samples, batch {args.batch}: wall time vs generation + heads time")
    for workers, r in pipe.items():
        print(f"  {workers} writer threads: wall {r['wall_s']:.2f} s, generation + heads {r['generate_and_heads_s']:.2f} s "
              f"(+{r['overhead'] * 100:.1f}%), waiting on the writer {r['write_wait_s']:.2f} s = "
              f"{r['idle_share'] * 100:.1f}% of the wall time")

    w1024 = writer_at_1024(batches=1 if args.smoke else 4, batch=1 if args.smoke else 4,
                           gpu_s=0.05 if args.smoke else 1.0)
    print("(f') writer alone at 1024², the GPU stood in for by a sleep: "
          + ", ".join(f"{k} writer threads: idle share {v['idle_share'] * 100:.1f}% (wall {v['wall_s']:.2f} s for "
                      f"{v['gpu_s']:.2f} s of 'GPU')" for k, v in w1024.items()))

    fl = flux_flops()
    print(f"(e) FLUX.1-dev 1024², 28 steps + 1: transformer {fl['generation'] / 1e15:.2f} PFLOP; heads "
          + ", ".join(f"{k} {v / 1e12:.2f} TFLOP" for k, v in fl["heads"].items())
          + f" → three heads' share {fl['heads_share'] * 100:.2f}% (goal ≤ 1%), one unified head's "
          f"{fl['unified_share'] * 100:.2f}%")
    res = {"compare": cmp, "throughput": tp, "memory": mem, "pipelining": pipe, "writer_1024": w1024, "flops": fl}
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
