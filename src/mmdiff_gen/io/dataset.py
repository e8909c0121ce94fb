"""Read back a dataset written by `generate` (WebDataset shards or the files layout), losslessly."""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .members import TASK_MEMBER, decode_depth, decode_gray, decode_image
from .shards import FILES_LAYOUT, read_stats

DATASET_FILE = "dataset.json"


@dataclass
class GeneratedSample:
    """One generated sample: image (H, W, 3) uint8 and its stored encoded bytes, prompt, per-sample metadata and the label maps
    it carries (seg (H, W) uint8 ids, 255 = ignore; saliency (H, W) uint8; depth (H, W) float32)."""

    key: str
    image: np.ndarray
    image_bytes: bytes
    prompt: str
    meta: dict
    labels: dict[str, np.ndarray] = field(default_factory=dict)


class GeneratedDataset:
    """The finished shards of a `generate` output folder, in key order.

    Args:
        root: the folder holding dataset.json.
        min_quality: only samples whose quality score (the JSON member's quality.score) is at least
            this; None: every written sample.
    """

    def __init__(self, root: Path, min_quality: float | None = None):
        self.root = Path(root)
        self.min_quality = min_quality
        p = self.root / DATASET_FILE
        if not p.is_file():
            raise FileNotFoundError(f"{self.root} has no {DATASET_FILE}: not an mmdiff-gen dataset")
        self.info = json.loads(p.read_text(encoding="utf-8"))
        self.format = self.info["format"]
        self.tasks = list(self.info["tasks"])
        self.depth_scale = float(self.info.get("depth", {}).get("scale", 1000.0))
        n = self.info["num_shards"]
        fp = self.info["fingerprint"]  # shards left from other inputs (before --overwrite) are not this dataset
        self.stats = {s: st for s in range(n) if (st := read_stats(self.root, s, fp)) is not None}

    @property
    def classes(self) -> list[str]:
        return list(self.info.get("classes", []))

    @property
    def palette(self) -> list[list[int]]:
        return [list(c) for c in self.info.get("palette", [])]

    def _kept(self, rec: dict) -> bool:
        """A shard-stats record is a sample of this view: written, and scored high enough."""
        return rec["status"] == "ok" and (self.min_quality is None or (rec.get("quality") or 0.0) >= self.min_quality)

    def __len__(self) -> int:
        return sum(self._kept(r) for st in self.stats.values() for r in st["samples"])

    def __iter__(self) -> Iterator[GeneratedSample]:
        for shard in sorted(self.stats):
            keep = {r["key"] for r in self.stats[shard]["samples"] if self._kept(r)}
            if self.format == "webdataset":
                yield from (x for x in self._tar_samples(self.root / f"{shard:05d}.tar") if x.key in keep)
            else:
                for rec in self.stats[shard]["samples"]:
                    if rec["key"] in keep:
                        yield self._files_sample(rec["key"])

    def _decode(self, key: str, members: dict[str, bytes]) -> GeneratedSample:
        img = members.get("jpg", members.get("png"))
        labels = {}
        for task in self.tasks:
            data = members[TASK_MEMBER[task]]
            labels[task] = decode_depth(data, self.depth_scale) if task == "depth" else decode_gray(data)
        return GeneratedSample(key=key, image=decode_image(img), image_bytes=img, prompt=members["txt"].decode("utf-8"),
                               meta=json.loads(members["json"]), labels=labels)

    def _tar_samples(self, path: Path) -> Iterator[GeneratedSample]:
        key, members = None, {}
        with tarfile.open(path) as tar:
            for info in tar:
                k, _, suffix = info.name.partition(".")
                if k != key and key is not None:
                    yield self._decode(key, members)
                    members = {}
                key = k
                members[suffix] = tar.extractfile(info).read()
        if key is not None:
            yield self._decode(key, members)

    def _files_sample(self, key: str) -> GeneratedSample:
        members = {}
        image = self.info["image_format"]
        for suffix, (folder, ext) in FILES_LAYOUT.items():
            p = self.root / folder / f"{key}.{ext}"
            if suffix in ("jpg", "png") and suffix != image:
                continue
            if p.is_file():
                members[suffix] = p.read_bytes()
        return self._decode(key, members)
