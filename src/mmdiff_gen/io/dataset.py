"""Read back a dataset written by `generate` (WebDataset shards or the files layout), losslessly."""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from ..tasks import get as get_task
from .members import DEPTH_SCALE, decode_image, decode_label
from .shards import DATASET_FILE, files_layout, read_json, read_stats, shard_name, shard_problem
from .store import Store, open_store


class IncompleteDataset(ValueError):
    """Some shards of the dataset are unfinished or damaged (and the reader was not told to allow it)."""


@dataclass
class ShardCheck:
    """Where each shard of a dataset stands.

    Args:
        finished: shard → its done marker's stats, for shards whose files match the marker.
        damaged: shard → why its files do not match its done marker (size; sha256 when checked in full).
        unfinished: shards without a done marker of this dataset (never written, in progress, or left
            from the inputs a `--overwrite` replaced).
        stray: tar files in the folder that belong to no shard of this dataset's plan.
    """

    num_shards: int
    finished: dict[int, dict] = field(default_factory=dict)
    damaged: dict[int, str] = field(default_factory=dict)
    unfinished: list[int] = field(default_factory=list)
    stray: list[str] = field(default_factory=list)

    @property
    def whole(self) -> bool:
        return not (self.damaged or self.unfinished or self.stray)

    def problems(self) -> str:
        """One line: what is not whole ('' when everything is)."""
        def names(shards):
            shards = list(shards)
            return ", ".join(shard_name(s) for s in shards[:5]) + (", …" if len(shards) > 5 else "")
        parts = []
        if self.unfinished:
            parts.append(f"{len(self.unfinished)} unfinished ({names(self.unfinished)})")
        if self.damaged:
            first = min(self.damaged)
            parts.append(f"{len(self.damaged)} damaged ({shard_name(first)}: {self.damaged[first]}"
                         + (f"; also {names(s for s in sorted(self.damaged) if s != first)}" if len(self.damaged) > 1
                            else "") + ")")
        if self.stray:
            parts.append(f"{len(self.stray)} stray tar(s) that are not part of it ({', '.join(self.stray[:5])})")
        return f"{len(self.finished)} of {self.num_shards} shards whole; " + "; ".join(parts) if parts else ""


def check_shards(root: "Path | str | Store", info: dict, full: bool = False) -> ShardCheck:
    """Compare every shard of the dataset described by `info` (dataset.json) with its done marker:
    sizes always, sha256 too when `full`."""
    root = open_store(root)
    n, fp = int(info["num_shards"]), info["fingerprint"]
    check = ShardCheck(num_shards=n)
    for s in range(n):
        st = read_stats(root, s, fp)
        if st is None:
            check.unfinished.append(s)
        elif (why := shard_problem(root, st, full)) is not None:
            check.damaged[s] = why
        else:
            check.finished[s] = st
    if info.get("format") == "webdataset":
        tars = (name.removesuffix(".tar") for name in root.names("*.tar"))
        check.stray = sorted(f"{t}.tar" for t in tars if not (t.isdigit() and int(t) < n))
    return check


def read_info(root: "Path | str | Store") -> dict:
    """A dataset's dataset.json (a folder or a URL); one clear error when there is none."""
    info = read_json(open_store(root), DATASET_FILE)
    if info is None:
        raise FileNotFoundError(f"{root} has no {DATASET_FILE}: not an mmdiff-gen dataset")
    if not info:
        raise ValueError(f"{root}: {DATASET_FILE} is not readable JSON")
    return info


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

    A dataset with unfinished or damaged shards (sizes checked against the done markers) is refused in
    one line unless `allow_partial`, which reads the whole shards only; `check` says what is missing.

    Args:
        root: the folder holding dataset.json.
        min_quality: only samples whose quality score (the JSON member's quality.score) is at least
            this; None: every written sample.
        allow_partial: read what is whole instead of refusing an incomplete dataset.
    """

    def __init__(self, root: "Path | str | Store", min_quality: float | None = None, allow_partial: bool = False):
        self.store = open_store(root)
        self.root = self.store.url()
        self.min_quality = min_quality
        self.info = read_info(self.store)
        self.format = self.info["format"]
        self.tasks = list(self.info["tasks"])
        self.check = check_shards(self.store, self.info)
        if not self.check.whole and not allow_partial:
            raise IncompleteDataset(f"{self.root}: {self.check.problems()}; re-run the same generate command to "
                                    "finish it, or pass --allow-partial to read the whole shards only")
        self.stats = self.check.finished

    def scale(self, task: str) -> float:
        """The PNG value per unit of a positive-valued task's labels (depth: 1000, millimetres)."""
        return float((self.info.get(task) or {}).get("scale", DEPTH_SCALE))

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
            if not keep:
                continue  # e.g. every sample filtered: no tar was published
            if self.format == "webdataset":
                yield from (x for x in self._tar_samples(f"{shard_name(shard)}.tar") if x.key in keep)
            else:
                for rec in self.stats[shard]["samples"]:
                    if rec["key"] in keep:
                        yield self._files_sample(rec["key"])

    def _decode(self, key: str, members: dict[str, bytes]) -> GeneratedSample:
        img = members.get("jpg", members.get("png"))
        labels = {}
        for task in self.tasks:
            labels[task] = decode_label(task, members[get_task(task).member], self.scale(task))
        return GeneratedSample(key=key, image=decode_image(img), image_bytes=img, prompt=members["txt"].decode("utf-8"),
                               meta=json.loads(members["json"]), labels=labels)

    def _tar_samples(self, name: str) -> Iterator[GeneratedSample]:
        key, members = None, {}
        # A stream (mode "r|"): one sequential read, what an object store serves best.
        with self.store.open(name) as f, tarfile.open(fileobj=f, mode="r|") as tar:
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
        for suffix, (folder, ext) in files_layout().items():
            if suffix in ("jpg", "png") and suffix != image:
                continue
            try:
                members[suffix] = self.store.read_bytes(f"{folder}/{key}.{ext}")
            except FileNotFoundError:
                pass
        return self._decode(key, members)
