"""The toy backbone's default heads and the paper's ablation (Table 5), trained on exact toy-world labels."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from ..backbones import load_backbone
from ..capture import CaptureSpec
from ..heads.checkpoint import read_meta
from ..io.readers import FilesDataset
from ..train.feature_cache import FeatureCache, build_cache
from ..train.trainer import TrainConfig, train_head
from .recipe import ASSET_DIR
from .render import write_scenes

HEADS_DIR = ASSET_DIR.parent / "toy_heads"
TRAIN_SEED, VAL_SEED = 100_000, 6_000_000  # disjoint from the backbone's scenes and the oracle's held-out set
TASKS = ("seg", "saliency", "depth")
# Toy heads: the backbone is 128 wide (aggregation width 32); decoders 32 wide suffice at 64×64 and keep
# a head's training to minutes on two CPU cores.
TOY_HEAD = (("decoder_channels", 32),)

# MMDiff Table 5, on the toy world. Sigma index 3 is t = 0.001 (capture orders sigmas noisiest first).
ABLATIONS = {
    "single-stream, t ≈ 0 only": dict(timesteps=(3,), side="none"),
    "+ averaged cross-attention (t ≈ 0)": dict(timesteps=(3,), side="cross"),
    "+ concept attention (t ≈ 0)": dict(timesteps=(3,), side="concepts"),
    "multi-timestep + concept attention": dict(side="concepts"),
    "multi-timestep (plain mean) + concept attention": dict(side="concepts", fusion="mean"),
}


def toy_caches(work: Path, train_scenes: int, val_scenes: int, model: str = "toy") -> tuple[FeatureCache, FeatureCache]:
    """Render train / val scenes and extract their feature caches (both resumable)."""
    work = Path(work)
    bb = load_backbone(model, dtype=torch.float32, device="cpu")
    spec = CaptureSpec.for_tasks(TASKS, cross_attention=True, store_device="cpu")
    caches = []
    for split, seed, n in (("train", TRAIN_SEED, train_scenes), ("val", VAL_SEED, val_scenes)):
        data = work / f"{split}_scenes"
        if not (data / "meta.jsonl").is_file() or len((data / "meta.jsonl").read_text().splitlines()) != n:
            if data.exists():
                shutil.rmtree(data)
            write_scenes(data, n, seed)
        build_cache(bb, FilesDataset(data), spec, work / f"{split}_cache", batch_size=64)
        caches.append(FeatureCache(work / f"{split}_cache"))
    return caches[0], caches[1]


def train_toy_heads(work: Path, *, train_scenes: int = 2000, val_scenes: int = 500, epochs: int = 6,
                    out: Path | None = None, tasks: tuple[str, ...] = TASKS) -> dict:
    """Train (or, with more epochs, continue) the shipped heads of the toy backbone; returns their val
    metrics, also written to OUT/metrics.json beside the heads (other tasks' entries are kept)."""
    train, val = toy_caches(work, train_scenes, val_scenes)
    out = HEADS_DIR if out is None else Path(out)
    classes = train.manifest["classes"]
    report = out / "metrics.json"
    result = json.loads(report.read_text()) if report.is_file() else {}
    for task in tasks:
        cfg = TrainConfig(task=task, epochs=epochs, batch_size=32, lr=1e-3, head=TOY_HEAD)
        train_head(train, cfg, out / f"{task}.safetensors", classes=classes, palette=train.manifest["palette"],
                   eval_cache=val, depth_unit="metre" if task == "depth" else "")
        result[task] = read_meta(out / f"{task}.safetensors").metrics  # what the file itself records
        report.write_text(json.dumps(result, indent=1))
    return result


def run_ablation(work: Path, *, train_scenes: int = 1000, val_scenes: int = 500, epochs: int = 4,
                 tasks: tuple[str, ...] = TASKS) -> dict:
    """Every ablation row × task, same data, epochs and seed; heads go to work/ablation/."""
    train, val = toy_caches(work, train_scenes, val_scenes)
    classes = train.manifest["classes"]
    table: dict = {}
    for name, kw in ABLATIONS.items():
        for task in tasks:
            cfg = replace(TrainConfig(task=task, epochs=epochs, batch_size=32, lr=1e-3, head=TOY_HEAD), **kw)
            slug = "".join(ch if ch.isalnum() else "_" for ch in name)[:40]
            table.setdefault(name, {})[task] = train_head(
                train, cfg, Path(work) / "ablation" / f"{slug}_{task}.safetensors", classes=classes, eval_cache=val)
    return table
