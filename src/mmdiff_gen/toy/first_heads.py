"""Heads for a backbone without the paper's inputs, on the toy world: does the caption matter, and is a labelled
dataset needed at all?

- `caption_study`: one head (seg + saliency + depth, one aggregation) trained on the same renders, each
  conditioned on the world's exact caption, on the oracle's reading of it (`toy.captioner`: the VLM's stand-in)
  or on the empty prompt, and scored on the held-out renders captioned the same way.
- `distill_study`: for N renders (N = 200, 1000), a head trained on the N renders and their exact labels
  against a head distilled from N generated images of N fresh captions labelled by the oracle (`jobs.distill`:
  nothing stored); both for the same steps, scored on the held-out renders and by the consistency protocol.

Everything lives under WORK (renders, caption files, caches, heads); a finished head is kept, a killed training
resumes from its state.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..backbones import load_backbone
from ..capture import CaptureSpec
from ..heads.checkpoint import read_meta
from ..io.datasets import open_dataset
from ..jobs.caption import caption_dataset
from ..jobs.distill import distill
from ..train.feature_cache import FeatureCache, build_cache
from ..train.trainer import TrainConfig, train_head
from .captioner import OracleCaptioner
from .consistency import run_consistency
from .heads_recipe import TASKS, TOY_HEAD, TRAIN_SEED, VAL_SEED
from .oracle import OracleTeacher
from .render import write_scenes
from .world import CLASSES, render_scene

CAPTIONS = ("exact", "oracle", "empty")
DISTILL_SEED = 8_000_000  # captions of the distilled heads' generated images: scenes no other set uses
KEYS = {"seg": "miou", "saliency": "max_f", "depth": "abs_rel"}


def _scenes(work: Path, split: str, seed: int, n: int) -> Path:
    folder = work / f"{split}_scenes_{n}"
    if not (folder / "meta.jsonl").is_file() or len((folder / "meta.jsonl").read_text().splitlines()) != n:
        write_scenes(folder, n, seed)
    return folder


def _captions(folder: Path, source: str) -> Path | None:
    """The caption file a source conditions `folder`'s renders on (None: the renders' own, exact captions)."""
    if source == "exact":
        return None
    path = folder.parent / f"{folder.name}.{source}.jsonl"
    if source == "empty":
        keys = open_dataset(folder).keys
        if not path.is_file():
            path.write_text("".join(json.dumps({"key": k, "caption": ""}) + "\n" for k in keys))
    else:
        caption_dataset(OracleCaptioner.load(), open_dataset(folder), path, batch_size=64)
    return path


def _scores(path: Path) -> dict:
    """{task: its headline metric} recorded in a head file."""
    m = read_meta(path).metrics
    return {t: m[t][KEYS[t]] for t in TASKS}


def caption_study(work: Path, *, train_scenes: int = 2000, val_scenes: int = 500, epochs: int = 4,
                  batch: int = 32, sources: tuple[str, ...] = CAPTIONS) -> dict:
    """{source: {task: metric}} of heads trained and scored with each caption source (module docstring)."""
    work = Path(work)
    bb = load_backbone("toy", dtype=torch.float32, device="cpu")
    spec = CaptureSpec.for_tasks(TASKS, store_device="cpu")
    folders = {"train": _scenes(work, "train", TRAIN_SEED, train_scenes), "val": _scenes(work, "val", VAL_SEED, val_scenes)}
    cfg = TrainConfig(tasks=TASKS, epochs=epochs, batch_size=batch, lr=1e-3, head=TOY_HEAD)
    out = {}
    for source in sources:
        caches = {}
        for split, folder in folders.items():
            ds = open_dataset(folder, captions=_captions(folder, source))
            caches[split] = FeatureCache(build_cache(bb, ds, spec, work / f"{split}_cache_{source}", batch_size=64))
        head = work / "captions" / source / "all.safetensors"
        if not head.is_file():
            train_head(caches["train"], cfg, head, classes=list(CLASSES), palette=caches["train"].manifest["palette"],
                       eval_cache=caches["val"], depth_unit="metre")
        out[source] = _scores(head)
    return out


def distill_study(work: Path, *, ns: tuple[int, ...] = (200, 1000), val_scenes: int = 500, steps: int = 200,
                  batch: int = 16, consistency_n: int = 200, sample_steps: int | None = None) -> dict:
    """{N: {"real" | "distilled": {"held_out": {task: metric}, "consistency": {task: metric}}}} (module
    docstring): both heads take `steps` steps of `batch` samples (⌈steps · batch / N⌉ epochs); generation at
    `sample_steps` (default: the backbone's)."""
    work = Path(work)
    bb = load_backbone("toy", dtype=torch.float32, device="cpu")
    spec = CaptureSpec.for_tasks(TASKS, store_device="cpu")
    val_folder = _scenes(work, "val", VAL_SEED, val_scenes)
    val = FeatureCache(build_cache(bb, open_dataset(val_folder), spec, work / "val_cache_exact", batch_size=64))
    out: dict = {}
    for n in ns:
        cfg = TrainConfig(tasks=TASKS, epochs=math.ceil(steps * batch / n), batch_size=batch, lr=1e-3, head=TOY_HEAD)
        heads = {"real": work / "distill" / f"real_{n}" / "all.safetensors",
                 "distilled": work / "distill" / f"distilled_{n}" / "all.safetensors"}
        if not heads["real"].is_file():
            folder = _scenes(work, "train", TRAIN_SEED, n)
            train = FeatureCache(build_cache(bb, open_dataset(folder), spec, work / f"train_cache_exact_{n}",
                                             batch_size=64))
            train_head(train, cfg, heads["real"], classes=list(CLASSES), palette=train.manifest["palette"],
                       eval_cache=val, depth_unit="metre")
        if not heads["distilled"].is_file():
            prompts = [render_scene(DISTILL_SEED + i).caption for i in range(n)]
            distill(bb, prompts, OracleTeacher(), cfg, heads["distilled"], seed=DISTILL_SEED, eval_source=val,
                    sampling={"num_inference_steps": sample_steps})
        out[n] = {"epochs": cfg.epochs}
        for name, head in heads.items():
            cons = run_consistency(head.parent, n=consistency_n, tasks=TASKS, keep=(), steps=sample_steps)
            out[n][name] = {"held_out": _scores(head), "consistency": {t: cons[t][KEYS[t]] for t in TASKS}}
    return out
