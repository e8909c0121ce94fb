"""The unified multi-task decoder (MMDiff App. C, Table 10) on the toy world.

One head per task against heads that share one aggregation — seg + saliency, seg + depth, all three — trained
alike (same scenes, steps, rates and seed; the multi-task losses weighted from their early magnitudes, see
`train.trainer`) and scored on the same held-out renders; then the heads' share of a generation pass: three
single-task heads against the one unified head reading the same capture. One head file per configuration
under WORK/unified/ (resumable: a finished file is kept, a killed training resumes from its state).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from ..backbones import load_backbone
from ..capture import generate
from ..heads.checkpoint import read_meta
from ..jobs.annotate import Annotator
from ..train.trainer import TrainConfig, train_head
from .heads_recipe import TASKS, TOY_HEAD, toy_caches
from .world import render_scene

CONFIGS: tuple[tuple[str, ...], ...] = (("seg",), ("saliency",), ("depth",), ("seg", "saliency"), ("seg", "depth"),
                                        ("seg", "saliency", "depth"))
TIMING_SEED = 7_800_000  # captions of the timing pass: scenes no other set uses


def _metrics(path: Path) -> tuple[dict[str, dict], dict]:
    """{task: scalar metrics} of a head file and its training record (loss weights of a multi-task head)."""
    meta = read_meta(path)
    tasks = meta.config.tasks
    by_task = {tasks[0]: meta.metrics} if len(tasks) == 1 else {t: meta.metrics[t] for t in tasks}
    scalars = {t: {k: v for k, v in m.items() if isinstance(v, (int, float))} for t, m in by_task.items()}
    return scalars, meta.metrics.get("train", {})


@torch.no_grad()
def heads_share(single: dict[str, Path], unified: Path, *, batch: int = 8, repeats: int = 5) -> dict:
    """Seconds of one generation pass of `batch` toy captions (capture included) and of the heads labelling it:
    the single-task heads (`single`, one file per task) against one `unified` head file serving all of them,
    each the minimum over `repeats`; their share of generation + heads."""
    bb = load_backbone("toy", dtype=torch.float32, device="cpu")
    annotators = {"single-task heads": Annotator(single, bb.identity()),
                  "unified head": Annotator(dict.fromkeys(single, unified), bb.identity())}
    a = annotators["single-task heads"]
    spec = a.spec(store_dtype="float32")  # the union of what both read: the unified head reads every concept
    kw = bb.sampling_kwargs()
    seeds = [TIMING_SEED + i for i in range(batch)]
    captions = [render_scene(s).caption for s in seeds]
    gen_s, cap = float("inf"), None
    for _ in range(2):  # the first pass warms up
        t0 = time.perf_counter()
        cap = generate(bb, captions, spec, seeds=seeds, output_type="np", **kw).capture
        gen_s = min(gen_s, time.perf_counter() - t0)
    size = (kw["height"], kw["width"])
    out = {"batch": batch, "generation_s": gen_s}
    for name, ann in annotators.items():
        ann(cap, size)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            ann(cap, size)
            best = min(best, time.perf_counter() - t0)
        out[name] = {"heads_s": best, "share": best / (gen_s + best)}
    return out


def run_unified(work: Path, *, train_scenes: int = 1000, val_scenes: int = 500, epochs: int = 12, seed: int = 0,
                timing_batch: int = 8) -> dict:
    """Train every configuration of CONFIGS (resumable) and report {config: {task: metrics}, loss weights,
    training seconds} plus the heads' share of generation (`heads_share`)."""
    work = Path(work)
    train, val = toy_caches(work, train_scenes, val_scenes)["feature"]
    folder = work / "unified"
    classes, palette = train.manifest["classes"], train.manifest["palette"]
    rows = {}
    for tasks in CONFIGS:
        name = "+".join(tasks)
        path = folder / f"{name}.safetensors"
        seconds = None
        if not path.is_file():
            print(f"[unified] {name}: {epochs} epochs on {len(train)} scenes", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            cfg = TrainConfig(tasks=tasks, epochs=epochs, batch_size=32, lr=1e-3, head=TOY_HEAD, seed=seed)
            train_head(train, cfg, path, classes=classes, palette=palette, eval_cache=val,
                       depth_unit="metre" if "depth" in tasks else "")
            seconds = time.perf_counter() - t0
        metrics, record = _metrics(path)
        rows[name] = {"metrics": metrics, "loss_weights": record.get("loss_weights"),
                      "steps": record.get("config", {}).get("epochs", epochs) * -(-len(train) // 32),
                      "train_s": seconds}
    timing = heads_share({t: folder / f"{t}.safetensors" for t in TASKS}, folder / f"{'+'.join(TASKS)}.safetensors",
                         batch=timing_batch)
    return {"train_scenes": len(train), "val_scenes": len(val), "epochs": epochs, "seed": seed, "configs": rows,
            "timing": timing}
