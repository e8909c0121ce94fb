"""Does our data train better models? The paper's downstream protocol (Tables 2–3, App. A Tables 6–8) on the
toy world, where "real" data with exact labels is free.

For each regime of N labelled real renders:
  1. MMDiff heads trained on those N renders only (real-image mode, all three tasks), and, beside them,
     single-timestep heads at t ≈ 0 (what the prior U-Net methods read);
  2. a downstream model that never sees DiT features — the oracle's U-Net architecture on pixels, one
     multi-task network — trained on the N renders: the *real only* row, and also the *pixel labeller*
     (the paper's "DINO-v3 standalone" baseline: a discriminative model labelling the generated images);
  3. one generation pass over fresh captions (`capture.generate`, as the dataset job runs it), whose capture
     every regime's heads read through the job's `Annotator`; the pixel labellers, openseg (zero-shot,
     segmentation only) and the oracle (the ceiling) label the same pixels;
  4. the downstream model trained on each label source's synthetic set (synthetic only), then fine-tuned
     on the N renders (synthetic pretraining + real fine-tuning); also with the worst quarter of samples
     dropped by the MMDiff annotator's quality score;
  5. every downstream model scored on the same held-out renders.

Everything is resumable from WORK: caches, heads, generated parts and downstream runs are each written
once (atomically) and skipped when present; each downstream run also keeps a step checkpoint. The settings
that shape the labels (regimes, heads, the generation pass) are WORK's own: another value is refused. The
settings of the downstream models only pick a folder WORK/runs/<their hash>/ (its runs, the pixel labellers'
labels of the stored images, its report), so a second downstream model reuses the heads and the generated set.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .._atomic import atomic_path
from ..backbones import load_backbone
from ..capture import CaptureSpec, generate
from ..heads.checkpoint import read_meta
from ..io.readers import Sample
from ..jobs.annotate import Annotator, build_annotator, head_files
from ..train.feature_cache import FeatureCache, build_cache
from ..train.metrics import DepthMetrics, SaliencyMetrics, SegMetrics
from ..train.trainer import TrainConfig, train_head
from ._loop import Phase, conv_autocast
from .data import SceneArrays, load_or_render
from .heads_recipe import TASKS, TOY_HEAD, VAL_SEED
from .oracle import Oracle, evaluate_oracle, pixel_losses
from .train_vae import to_pixels
from .world import CLASSES, render_scene

REAL_SEED = 8_500_000  # the regimes' "real" renders (nested: a regime is the first N); no other set uses them
SYN_SEED = 9_000_000  # captions and noise seeds of the generated images
HEAD_KINDS = {"mmdiff": None, "t0": (3,)}  # all four sigmas + concepts; sigma index 3 (t = 0.001) + concepts


@dataclass(frozen=True)
class DownstreamConfig:
    """One run of the protocol (the defaults are docs/toy-results.md's run: ≈ 3 h of a 2-core CPU for three regimes).

    Args:
        regimes: numbers of labelled real renders.
        synthetic: generated images (one pass, shared by every regime and label source).
        eval_scenes: held-out renders every downstream model is scored on (the heads' validation set).
        head_steps: optimiser steps of each MMDiff / t ≈ 0 head (epochs follow from N and `batch`).
        steps: downstream steps from scratch (real only, synthetic only).
        batch: samples per step of every training (heads and downstream models).
        finetune_steps: real fine-tuning steps after synthetic pretraining, at `finetune_lr`.
        width: the downstream U-Net's first-stage width (the oracle's architecture and width: at 16, even
            1 000 real renders taught it 33 mIoU in 600 steps, against 75 at 32).
        drop_worst: fraction of generated samples the quality filter drops.
        gen_batch: prompts per generation pass.
        sample_steps: sampling steps (None: the backbone's recommendation).
        seed: initialisation and shuffling seed of the downstream models.
    """

    # What shapes the heads and the generated, labelled set; the other fields shape only the downstream models.
    LABELS = ("regimes", "synthetic", "eval_scenes", "head_steps", "batch", "gen_batch", "sample_steps")

    regimes: tuple[int, ...] = (50, 200, 1000)
    synthetic: int = 2000
    eval_scenes: int = 500
    head_steps: int = 300
    steps: int = 600
    finetune_steps: int = 300
    batch: int = 32
    width: int = 32
    lr: float = 2e-3
    finetune_lr: float = 5e-4
    drop_worst: float = 0.25
    gen_batch: int = 25
    sample_steps: int | None = None
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "regimes", tuple(sorted({int(n) for n in self.regimes})))
        if not self.regimes or self.regimes[0] < 1:
            raise ValueError(f"regimes must be positive scene counts, got {self.regimes}")
        for name in ("synthetic", "eval_scenes", "head_steps", "steps", "finetune_steps", "batch", "width",
                     "gen_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if not 0 <= self.drop_worst < 1:
            raise ValueError(f"drop_worst must lie in [0, 1), got {self.drop_worst}")


def _log(msg: str) -> None:
    print(f"[downstream] {msg}", file=sys.stderr, flush=True)


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=1))


# --- labelled sets --------------------------------------------------------------------------------

@dataclass
class Labelled:
    """Images and the labels one source gives them (a task it does not label is None).

    images (N, H, W, 3) uint8; seg (N, H, W) uint8 ids; saliency (N, H, W) uint8 0–255; depth (N, H, W) metres;
    score (N,) the per-sample quality score of an annotator that gives one (heads.quality)."""

    images: np.ndarray
    seg: np.ndarray | None
    saliency: np.ndarray | None
    depth: np.ndarray | None
    score: np.ndarray | None = None

    @classmethod
    def real(cls, a: SceneArrays, n: int | None = None) -> "Labelled":
        n = len(a) if n is None else n
        return cls(a.images[:n], a.seg[:n], np.where(a.seg[:n] > 0, 255, 0).astype(np.uint8),
                   a.depth[:n].astype(np.float32))

    def subset(self, idx: np.ndarray) -> "Labelled":
        return Labelled(*(None if x is None else x[idx]
                          for x in (self.images, self.seg, self.saliency, self.depth, self.score)))


# --- the downstream model -------------------------------------------------------------------------

def _batch(data: Labelled, idx: np.ndarray, flip: np.ndarray, device) -> tuple[torch.Tensor, dict]:
    """Pixels (B, 3, H, W) in [−1, 1] and the labelled tasks' targets, mirrored where `flip`."""
    def pick(x):
        x = x[idx].copy()
        x[flip] = x[flip][:, :, ::-1]
        return torch.from_numpy(np.ascontiguousarray(x))
    x = to_pixels(pick(data.images).numpy()).to(device)
    targets = {t: pick(getattr(data, t)).to(device) for t in TASKS if getattr(data, t) is not None}
    return x, targets


def train_downstream(data: Labelled, cfg: DownstreamConfig, work: Path, name: str, *, steps: int, lr: float,
                     init: Path | None = None, device: str = "cpu") -> Path:
    """Train the downstream U-Net on `data` (from `init`'s weights if given); returns work/NAME.safetensors.

    Resumable: a finished run is skipped; an interrupted one resumes from its step checkpoint."""
    out = Path(work) / f"{name}.safetensors"
    if out.is_file():
        return out
    _log(f"{name}: {steps} steps on {len(data.images)} images" + (f", from {Path(init).stem}" if init else ""))
    torch.manual_seed(cfg.seed)
    model = Oracle(width=cfg.width) if init is None else Oracle.from_checkpoint(init)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    phase = Phase(work, name, {"model": model, "opt": opt}, steps, lr=lr, warmup=min(50, steps // 10))
    rng = np.random.default_rng([cfg.seed, phase.start])
    t0 = time.time()
    for _ in phase:
        idx = rng.integers(0, len(data.images), cfg.batch)
        x, targets = _batch(data, idx, rng.random(cfg.batch) < 0.5, device)
        with conv_autocast(device):
            pred = model(x)
        phase.step(pixel_losses(pred, targets))
    model.eval()
    model.save(out, {"steps": steps, "samples": len(data.images), "seconds": round(time.time() - t0, 1)})
    phase.checkpoint.path.unlink(missing_ok=True)  # the finished model file replaces the resume state
    return out


def score(model_file: Path, held: SceneArrays, tasks: tuple[str, ...] = tuple(TASKS), device: str = "cpu") -> dict:
    """The downstream model's metrics on the held-out renders (only the tasks it was trained for)."""
    metrics = evaluate_oracle(Oracle.from_checkpoint(model_file).to(device), held.images, held)
    return {t: metrics[t] for t in tasks}


def label_agreement(labels: Labelled, ref: Labelled) -> dict:
    """How well one source's labels of the generated images agree with the oracle's reading of them."""
    out = {}
    if labels.seg is not None:
        m = SegMetrics(len(CLASSES))
        for p, g in zip(labels.seg, ref.seg):
            m.update(p, g)
        out["seg"] = m.result()
    if labels.saliency is not None:
        m = SaliencyMetrics()
        for p, g in zip(labels.saliency, ref.saliency):
            m.update(p, np.where(g >= 128, 255, 0).astype(np.uint8))
        out["saliency"] = m.result()
    if labels.depth is not None:
        m = DepthMetrics()
        for p, g in zip(labels.depth, ref.depth):
            m.update(p, g)
        out["depth"] = m.result()
    return out


# --- the protocol ---------------------------------------------------------------------------------

def _samples(arrays: SceneArrays, n: int, first_seed: int) -> list[Sample]:
    real = Labelled.real(arrays, n)  # the exact labels, saliency included
    return [Sample(f"{first_seed + i:09d}", real.images[i], arrays.captions[i],
                   {"seg": real.seg[i], "saliency": real.saliency[i], "depth": real.depth[i]}) for i in range(n)]


def _train_heads(bb, work: Path, real: SceneArrays, n: int, cfg: DownstreamConfig, val: FeatureCache) -> dict:
    """MMDiff and t ≈ 0 heads on the first n real renders; {kind: heads folder}."""
    spec = CaptureSpec.for_tasks(TASKS, store_device="cpu")
    cache = FeatureCache(build_cache(bb, _samples(real, n, REAL_SEED), spec, work / f"cache_{n}", batch_size=64))
    epochs = max(1, math.ceil(cfg.head_steps / math.ceil(n / cfg.batch)))
    folders = {}
    for kind, timesteps in HEAD_KINDS.items():
        folder = work / f"heads_{n}" / kind
        for task in TASKS:
            out = folder / f"{task}.safetensors"
            if out.is_file():
                continue
            _log(f"heads {kind}, N={n}: {task} ({epochs} epochs)")
            tc = TrainConfig(tasks=task, epochs=epochs, batch_size=cfg.batch, lr=1e-3, head=TOY_HEAD, timesteps=timesteps,
                             seed=cfg.seed)
            train_head(cache, tc, out, classes=list(CLASSES), eval_cache=val,
                       depth_unit="metre" if task == "depth" else "")
        folders[kind] = folder
    return folders


def _generate(bb, work: Path, cfg: DownstreamConfig, annotators: dict[str, Annotator],
              labellers: dict[str, Oracle]) -> dict[str, Labelled]:
    """One generation pass over fresh captions, labelled by every source; parts of gen_batch images on disk."""
    kw = bb.sampling_kwargs(**({} if cfg.sample_steps is None else {"num_inference_steps": cfg.sample_steps}))
    size = (kw["height"], kw["width"])
    anns = list(annotators.values())
    spec = CaptureSpec(
        layers=tuple(sorted({i for a in anns for i in a.layers})),
        sigmas=tuple(sorted({s for a in anns for s in a.sigmas}, reverse=True)),
        concepts=tuple(dict.fromkeys(w for a in anns for w in a.concepts)),
        text_attention_layers=tuple(sorted({a.openseg.layer for a in anns if a.openseg})))
    folder = work / "synthetic"
    folder.mkdir(parents=True, exist_ok=True)
    for start in range(0, cfg.synthetic, cfg.gen_batch):
        part = folder / f"part_{start:06d}.npz"
        if part.is_file():
            continue
        n = min(cfg.gen_batch, cfg.synthetic - start)
        seeds = [SYN_SEED + start + i for i in range(n)]
        captions = [render_scene(s).caption for s in seeds]
        gen = generate(bb, captions, spec, seeds=seeds, output_type="np", **kw)
        images = (gen.images * 255).round().astype(np.uint8)  # (B, H, W, 3): what a dataset stores
        arrays = {"images": images}
        for src, ann in annotators.items():
            a = ann(gen.capture, size, prompts=captions)
            for task, lab in a.labels.items():
                arrays[f"{src}/{task}"] = lab.numpy()
            if any(q["score"] is not None for q in a.quality):
                arrays[f"{src}/score"] = np.array([q["score"] for q in a.quality], np.float32)
        for src, model in labellers.items():
            for task, lab in model.predict(images).items():
                arrays[f"{src}/{task}"] = lab
        with atomic_path(part) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
        _log(f"generated {start + n}/{cfg.synthetic}")
    parts = [np.load(folder / f"part_{s:06d}.npz", allow_pickle=False) for s in range(0, cfg.synthetic, cfg.gen_batch)]
    cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0].files}
    sources = {k.split("/")[0] for k in cat if "/" in k}
    return {src: Labelled(cat["images"], cat.get(f"{src}/seg", cat.get(f"{src}/openseg")), cat.get(f"{src}/saliency"),
                          None if f"{src}/depth" not in cat else cat[f"{src}/depth"].astype(np.float32),
                          cat.get(f"{src}/score")) for src in sources}


def _labelled_by_pixels(synthetic: dict[str, Labelled], runs: Path, regimes: tuple[int, ...],
                        device: str) -> dict[str, Labelled]:
    """The pixel labellers' (each regime's real-only model's) labels of the stored generated images, read once and
    kept in runs/pixel_N.npz."""
    images = synthetic["oracle"].images
    out = {}
    for n in regimes:
        path = runs / f"pixel_{n}.npz"
        if not path.is_file():
            labels = Oracle.from_checkpoint(runs / f"real_{n}.safetensors").to(device).predict(images)
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.savez(f, **labels)
        lab = np.load(path, allow_pickle=False)
        out[f"pixel_{n}"] = Labelled(images, lab["seg"], lab["saliency"], lab["depth"].astype(np.float32))
    return out


def _without_train(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "train"}  # a head file's metrics also record its training


def run_downstream(work: Path, cfg: DownstreamConfig = DownstreamConfig(), model: str = "toy",
                   device: str | None = None) -> dict:
    """Run (or resume) the whole protocol in `work`; returns the report, also written to work/report.json."""
    work = Path(work)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    everything = json.loads(json.dumps(asdict(cfg)))
    labels = {k: everything[k] for k in cfg.LABELS}
    models = {k: v for k, v in everything.items() if k not in labels}
    settings = work / "config.json"
    if settings.is_file():
        old = json.loads(settings.read_text())
        old = {k: old[k] for k in cfg.LABELS if k in old}  # a folder of the first layout also lists model settings
        if old != labels:
            raise ValueError(f"{work} holds heads and a generated set made with other settings ({settings}: "
                             + ", ".join(f"{k} {old.get(k)} ≠ {v}" for k, v in labels.items() if old.get(k) != v)
                             + "): use another --work folder")
    _write_json(settings, labels)
    runs = work / "runs" / hashlib.sha256(json.dumps(models, sort_keys=True).encode()).hexdigest()[:12]
    _write_json(runs / "config.json", models)
    t_start = time.time()
    times: dict[str, float] = {}

    def lap(name: str, t: float) -> None:
        times[name] = round(times.get(name, 0) + time.time() - t, 1)

    bb = load_backbone(model, dtype=torch.float32, device=device)
    real = load_or_render(work / "real.npz", REAL_SEED, max(cfg.regimes))
    held = load_or_render(work / "held_out.npz", VAL_SEED, cfg.eval_scenes)
    t = time.time()
    spec = CaptureSpec.for_tasks(TASKS, store_device="cpu")
    val = FeatureCache(build_cache(bb, _samples(held, len(held), VAL_SEED), spec, work / "cache_held_out",
                                   batch_size=64))
    heads = {n: _train_heads(bb, work, real, n, cfg, val) for n in cfg.regimes}
    lap("heads (extraction + training)", t)

    t = time.time()
    for n in cfg.regimes:  # real only: also each regime's pixel labeller
        train_downstream(Labelled.real(real, n), cfg, runs, f"real_{n}", steps=cfg.steps, lr=cfg.lr, device=device)
    lap("downstream training", t)

    t = time.time()
    annotators = {"openseg": build_annotator(bb, {}, list(CLASSES))}
    for n, kinds in heads.items():
        for kind, folder in kinds.items():
            annotators[f"{kind}_{n}"] = build_annotator(bb, head_files(folder, TASKS))
    synthetic = _generate(bb, work, cfg, annotators, {"oracle": Oracle.from_checkpoint().to(device)})
    synthetic |= _labelled_by_pixels(synthetic, runs, cfg.regimes, device)
    lap("generation and labelling", t)

    t = time.time()
    report: dict = {"config": asdict(cfg), "regimes": {}}
    ref = synthetic["oracle"]
    oracle_syn = train_downstream(ref, cfg, runs, "syn_oracle", steps=cfg.steps, lr=cfg.lr, device=device)
    report["synthetic only, oracle labels"] = score(oracle_syn, held, device=device)
    for n in cfg.regimes:
        real_n = Labelled.real(real, n)
        r = report["regimes"][str(n)] = {
            "heads on held-out renders": {kind: {task: _without_train(read_meta(folder / f"{task}.safetensors").metrics)
                                                 for task in TASKS} for kind, folder in heads[n].items()},
            "labels vs oracle": {}, "downstream": {"real only": score(runs / f"real_{n}.safetensors", held, device=device)}}
        sources = {"mmdiff": synthetic[f"mmdiff_{n}"], "t0": synthetic[f"t0_{n}"], "pixel": synthetic[f"pixel_{n}"],
                   "openseg": synthetic["openseg"]}
        mm = sources["mmdiff"]
        keep = np.argsort(-mm.score, kind="stable")[: max(1, round((1 - cfg.drop_worst) * len(mm.score)))]
        sources["mmdiff_filtered"] = mm.subset(np.sort(keep))
        sources["oracle"] = ref
        for src, data in sources.items():
            tasks = tuple(t for t in TASKS if getattr(data, t) is not None)
            if src != "oracle":
                r["labels vs oracle"][src] = label_agreement(data, ref if src != "mmdiff_filtered"
                                                             else ref.subset(np.sort(keep)))
                pre = train_downstream(data, cfg, runs, f"syn_{src}_{n}", steps=cfg.steps, lr=cfg.lr, device=device)
                r["downstream"][f"synthetic only: {src}"] = score(pre, held, tasks, device)
            else:
                pre = oracle_syn
            ft = train_downstream(real_n, cfg, runs, f"ft_{src}_{n}", steps=cfg.finetune_steps, lr=cfg.finetune_lr,
                                  init=pre, device=device)
            r["downstream"][f"synthetic → real: {src}"] = score(ft, held, device=device)
        _log(f"regime N={n} scored")
    lap("downstream training", t)
    report["seconds"] = times | {"total (this invocation)": round(time.time() - t_start, 1)}
    _write_json(runs / "report.json", report)
    return json.loads(json.dumps(report))  # what report.json holds (lists, not tuples)
