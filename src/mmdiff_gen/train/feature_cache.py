"""Backbone features extracted once (real-image mode) and stored in shards, so head training never reruns it.

Layout: DIR/cache.json (backbone identity, capture spec, grid, image size, shard list) and
DIR/shard_00000.safetensors … holding, per sample: features (L, T, N, C) in the spec's store dtype
(bf16 by default: FLUX's massive activations overflow fp16), concept_maps (T, K, N) and
cross_attention (T, N) when captured, dino (E, h, w) bf16 DINOv3 maps when asked for, and the labels present (seg, saliency uint8; depth float32 metres). A shard
is written then renamed and listed in cache.json last, so a killed extraction resumes at the
first missing shard.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ..backbones.base import Backbone
from ..backbones.dino import DinoFeatures, images_tensor
from ..capture import CaptureSpec, extract
from ..io.readers import Sample

LABELS = ("seg", "saliency", "depth")


def check_one_size(samples: Sequence[Sample], shape: tuple[int, ...]) -> None:
    """One token grid per cache: every image must have the first one's size."""
    for x in samples:
        if x.image.shape != shape:
            raise ValueError(f"image {x.key} is {x.image.shape[1]}×{x.image.shape[0]}, the first one "
                             f"{shape[1]}×{shape[0]}: pass --size to resize and crop every image to one size")


def build_cache(backbone: Backbone, samples: Sequence[Sample], spec: CaptureSpec, out: Path, *,
                shard_size: int = 256, batch_size: int = 16, seed: int = 0,
                on_batch: Callable[[int], None] | None = None, dino: DinoFeatures | None = None) -> Path:
    """Extract features of every sample into `out` (resumable: finished shards are kept).

    `samples` is any sequence of Sample; a dataset reader (with a `keys` list) is read lazily,
    one shard at a time.

    Noise seeds are seed + sample index, so a cache is reproducible whatever the batch size. With
    `dino`, the DINOv3 maps of every image are stored too (MMDiff §3.3's optional features).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "cache.json"
    keys = samples.keys if hasattr(samples, "keys") else [x.key for x in samples]  # datasets load lazily
    first = samples[0]
    h, w = first.image.shape[:2]
    manifest = {
        "backbone": backbone.identity(),
        "spec": spec.to_dict(),
        "grid": list(backbone.token_grid(h, w)),
        "layers": list(spec.layers if spec.layers is not None else backbone.default_layers()),
        "image_size": [h, w],
        "count": len(samples),
        "keys_sha256": hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16],
        "shard_size": shard_size,
        "seed": seed,
        "labels": [k for k in LABELS if getattr(first, k) is not None],
        "classes": list(getattr(samples, "classes", [])),
        "palette": list(getattr(samples, "palette", [])),
        "dino": dino.identity() if dino is not None else {},
        "shards": [],
    }
    manifest = json.loads(json.dumps(manifest))  # tuples → lists, as it will read back
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if {k: v for k, v in old.items() if k != "shards"} != {k: v for k, v in manifest.items() if k != "shards"}:
            raise ValueError(f"{out} holds a feature cache of other data or settings; use a new folder")
        manifest["shards"] = old["shards"]
    done = set(manifest["shards"])
    for s, start in enumerate(range(0, len(samples), shard_size)):
        name = f"shard_{s:05d}.safetensors"
        if name in done:
            continue
        part = [samples[i] for i in range(start, min(start + shard_size, len(samples)))]
        tensors: dict[str, list[torch.Tensor]] = {}
        for b in range(0, len(part), batch_size):
            batch = part[b : b + batch_size]
            check_one_size(batch, first.image.shape)
            images = [Image.fromarray(x.image) for x in batch]
            res = extract(backbone, images, spec, captions=[x.caption for x in batch],
                          seeds=[seed + start + b + i for i in range(len(batch))])
            if dino is not None:
                tensors.setdefault("dino", []).append(dino(images_tensor(images), res.grid).to(torch.bfloat16).cpu())
            tensors.setdefault("features", []).append(res.features.cpu())
            if res.concept_maps is not None:
                tensors.setdefault("concept_maps", []).append(res.concept_maps.cpu())
            if res.cross_attention is not None:
                tensors.setdefault("cross_attention", []).append(res.cross_attention.cpu())
            for key in manifest["labels"]:
                arr = np.stack([getattr(x, key) for x in batch])
                tensors.setdefault(key, []).append(torch.from_numpy(arr.astype(np.float32 if key == "depth" else np.uint8)))
            if on_batch is not None:
                on_batch(len(batch))
        tensors["index"] = [torch.arange(start, start + len(part))]
        tmp = out / f".{name}.tmp"
        save_file({k: torch.cat(v).contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, out / name)
        manifest["shards"].append(name)
        tmp = out / ".cache.json.tmp"
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, manifest_path)
    if not manifest_path.is_file():
        manifest_path.write_text(json.dumps(manifest, indent=1))
    return out


class FeatureCache:
    """Reads a finished cache: metadata plus shard-by-shard batches for training and evaluation."""

    def __init__(self, root: Path):
        self.root = Path(root)
        path = self.root / "cache.json"
        if not path.is_file():
            raise FileNotFoundError(f"{self.root} has no cache.json: not a feature cache")
        self.manifest = json.loads(path.read_text())
        expected = -(-self.manifest["count"] // self.manifest["shard_size"])
        if len(self.manifest["shards"]) != expected:
            raise ValueError(f"{self.root} is unfinished ({len(self.manifest['shards'])}/{expected} shards): "
                             "re-run the extraction to complete it")

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.manifest["grid"])

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.manifest["layers"])

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.manifest["image_size"])

    @property
    def spec(self) -> CaptureSpec:
        return CaptureSpec(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in self.manifest["spec"].items()})

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def shard(self, name: str) -> dict[str, torch.Tensor]:
        return load_file(str(self.root / name))

    def batches(self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None
                ) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of whole samples; with `shuffle`, shards in random order and samples shuffled within."""
        names = list(self.manifest["shards"])
        if shuffle:
            names = [names[i] for i in torch.randperm(len(names), generator=generator)]
        for name in names:
            data = self.shard(name)
            n = data["index"].shape[0]
            order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
            for i in range(0, n, batch_size):
                idx = order[i : i + batch_size]
                yield {k: v[idx] for k, v in data.items()}
