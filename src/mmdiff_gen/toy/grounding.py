"""Seg4Diff's mask-alignment LoRA on the toy world, before / after on the same captions and seeds.

The shipped toy backbone is fine-tuned (`train.grounding`) on labelled renders with their own captions (which name
every shape), its attention loss on the expert block (the probe's, or the backbone's default). Then, for the base
backbone and the fine-tuned one alike:
  1. openseg on held-out renders at the expert setting (the probe's protocol: every attention block at the expert
     sigma and threshold; the expert block's cell and the best one reported);
  2. the consistency protocol on generated images, scored against the oracle: openseg, and a seg head retrained
     on that backbone's features with one recipe (so the two heads differ only by the backbone);
  3. prompt fidelity judged by the oracle (`toy fidelity`'s protocol: 1 and 2 objects).
Everything under WORK is resumable (the LoRA, the caches and the heads are kept; the protocols rerun).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ..backbones import load_backbone
from ..backbones.loading import LORA_WEIGHTS
from ..heads.checkpoint import read_meta
from ..io.readers import FilesDataset
from ..jobs.probe import probe_scores
from ..train.feature_cache import FeatureCache, build_cache
from ..train.grounding import GroundingConfig, finetune_grounding
from ..train.trainer import TrainConfig, train_head
from .consistency import run_consistency
from .fidelity_run import run_fidelity
from .heads_recipe import TOY_HEAD, toy_caches
from .world import CLASSES


def _log(msg: str) -> None:
    print(f"[grounding] {msg}", file=sys.stderr, flush=True)


def _seg_head(work: Path, name: str, train: FeatureCache, val: FeatureCache, epochs: int) -> Path:
    """A seg head (the shipped heads' recipe) trained on one backbone's feature caches; its folder."""
    folder = work / f"grounding_heads_{name}"
    out = folder / "seg.safetensors"
    if not out.is_file():
        _log(f"seg head on the {name} backbone: {epochs} epochs")
        train_head(train, TrainConfig(tasks="seg", epochs=epochs, batch_size=32, lr=1e-3, head=TOY_HEAD), out,
                   classes=list(CLASSES), palette=train.manifest["palette"], eval_cache=val)
    return folder


def run_grounding(work: Path, *, train_scenes: int = 1000, val_scenes: int = 500, cfg: GroundingConfig | None = None,
                  probe_n: int = 200, consistency_n: int = 200, fidelity_n: int = 100, head_epochs: int = 6,
                  model: str = "toy", grounding: dict | None = None) -> dict:
    """Fine-tune (resumable), then measure base and fine-tuned alike; returns {"lora", "base", "fine-tuned"}.

    `grounding` ({"layer", "sigma", "threshold"}, None values kept) overrides the backbone's expert setting: the
    block the LoRA aligns (unless `cfg.layer` says) and where openseg reads."""
    work = Path(work)
    cfg = cfg or GroundingConfig(steps=600, batch_size=8, lr=1e-4, warmup=50)
    bb = load_backbone(model, dtype=torch.float32, device="cpu")  # the base: its grounding default, then fine-tuned
    g = bb.default_grounding()
    g |= {k: v for k, v in (grounding or {}).items() if v is not None}
    if cfg.layer is None:
        cfg = replace(cfg, layer=g["layer"])
    base_caches = toy_caches(work, train_scenes, val_scenes)["feature"]  # the renders, the base backbone's caches
    lora_dir = work / "grounding_lora"
    t0 = time.time()
    if not (lora_dir / LORA_WEIGHTS).is_file():
        finetune_grounding(bb, FilesDataset(work / "train_scenes"), CLASSES, lora_dir, cfg)
    report: dict = {"lora": {"config": asdict(cfg), "seconds": round(time.time() - t0, 1)}}
    for name, lora in (("base", None), ("fine-tuned", lora_dir)):
        t0 = time.time()
        bb = load_backbone(model, dtype=torch.float32, device="cpu", lora=lora)
        _log(f"{name}: probe, seg head, consistency, fidelity")
        probe = probe_scores(bb, FilesDataset(work / "val_scenes"), CLASSES, sigmas=(g["sigma"],), n=probe_n,
                             thresholds=(g["threshold"],)).result()
        miou = probe["miou"][:, 0, 0]  # (blocks,) at the expert sigma and threshold
        if lora is None:
            caches = base_caches
        else:  # the same renders and capture spec through the fine-tuned backbone
            caches = tuple(FeatureCache(build_cache(bb, FilesDataset(work / f"{split}_scenes"), base_caches[0].spec,
                                                    work / f"{split}_cache_lora", batch_size=64))
                           for split in ("train", "val"))
        heads = _seg_head(work, name, *caches, head_epochs)
        cons = run_consistency(heads, n=consistency_n, tasks=("seg",), lora=lora, grounding=g)
        fid = run_fidelity(model, fidelity_n, [1, 2], 50, None, lora=lora)
        report[name] = {
            "openseg on renders (expert block)": {"block": g["layer"], "sigma": g["sigma"],
                                                  "miou": float(miou[g["layer"]])},
            "openseg on renders (best block)": {"block": int(miou.argmax()), "miou": float(miou.max())},
            "openseg vs oracle on generated": cons["openseg"]["miou"],
            "seg head on renders": read_meta(heads / "seg.safetensors").metrics["miou"],
            "seg head vs oracle on generated": cons["seg"]["miou"],
            "fidelity": {k: v["generated"] for k, v in fid.items() if k.endswith("_object")},
            "seconds": round(time.time() - t0, 1)}
    return report
