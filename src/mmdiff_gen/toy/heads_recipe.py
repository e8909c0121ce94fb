"""The toy backbone's default heads, trained on exact toy-world labels (and the caches the ablation shares)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..backbones import load_backbone
from ..capture import CaptureSpec
from ..heads.card import write_card
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


def toy_caches(work: Path, train_scenes: int, val_scenes: int, model: str = "toy",
               blocks: tuple[str, ...] = ("feature",)) -> dict[str, tuple[FeatureCache, FeatureCache]]:
    """Render train / val scenes once and extract their feature caches (all resumable), per block list:
    {blocks: (train, val)}; "joint": features of the double-stream blocks (caches *_cache_joint)."""
    work = Path(work)
    bb = load_backbone(model, dtype=torch.float32, device="cpu")
    data = {}
    for split, seed, n in (("train", TRAIN_SEED, train_scenes), ("val", VAL_SEED, val_scenes)):
        data[split] = work / f"{split}_scenes"
        meta = data[split] / "meta.jsonl"
        if not meta.is_file() or len(meta.read_text().splitlines()) != n:
            if data[split].exists():
                shutil.rmtree(data[split])
            write_scenes(data[split], n, seed)
    caches = {}
    for b in blocks:
        spec = CaptureSpec.for_tasks(TASKS, cross_attention=True, store_device="cpu", blocks=b)
        suffix = "" if b == "feature" else f"_{b}"
        for split in data:
            build_cache(bb, FilesDataset(data[split]), spec, work / f"{split}_cache{suffix}", batch_size=64)
        caches[b] = (FeatureCache(work / f"train_cache{suffix}"), FeatureCache(work / f"val_cache{suffix}"))
    return caches


def train_toy_heads(work: Path, *, train_scenes: int = 2000, val_scenes: int = 500, epochs: int = 6,
                    out: Path | None = None, tasks: tuple[str, ...] = TASKS) -> dict:
    """Train (or, with more epochs, continue) the shipped heads of the toy backbone; returns their val
    metrics, also written to OUT/metrics.json beside the heads (other tasks' entries are kept)."""
    train, val = toy_caches(work, train_scenes, val_scenes)["feature"]
    out = HEADS_DIR if out is None else Path(out)
    classes = train.manifest["classes"]
    report = out / "metrics.json"
    result = json.loads(report.read_text()) if report.is_file() else {}
    for task in tasks:
        cfg = TrainConfig(tasks=task, epochs=epochs, batch_size=32, lr=1e-3, head=TOY_HEAD)
        train_head(train, cfg, out / f"{task}.safetensors", classes=classes, palette=train.manifest["palette"],
                   eval_cache=val, depth_unit="metre" if task == "depth" else "")
        result[task] = read_meta(out / f"{task}.safetensors").metrics  # what the file itself records
        report.write_text(json.dumps(result, indent=1))
    write_card(out)  # the folder stays a Hub model repo: its card and config.json cover the new heads
    return result
