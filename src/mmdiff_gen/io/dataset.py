"""Read back a dataset written by `generate` (WebDataset shards or the files layout), losslessly."""

from __future__ import annotations

import hashlib
import json
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .members import DEPTH_SCALE, VIDEO_FORMAT, decode_image, decode_label, decode_label_stack, decode_video, label_member
from .shards import (DATASET_FILE, SIZES_FILE, WIDS_INDEX, files_layout, read_json, read_stats, shard_name,
                     shard_problem, stats_name, write_indexes)
from .store import Store, open_store


class IncompleteDataset(ValueError):
    """Some shards of the dataset are unfinished or damaged (and the reader was not told to allow it)."""


class DamagedShard(ValueError):
    """A shard's bytes do not match its done marker, or a member of it cannot be decoded: found while reading."""


REPAIR = "mmdiff-gen verify --repair DATASET, then re-run the same generate command"


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


def index_entries(finished: dict[int, dict]) -> dict[str, tuple[int, int]]:
    """What sizes.json and the wids index list: each whole shard with samples (an all-filtered one has no tar) as
    {shard file: (samples, bytes)}, in shard order. The files layout is keyed the same way."""
    return {f"{shard_name(s)}.tar": (st["written"], sum(f["bytes"] for f in st.get("files", {}).values()))
            for s, st in sorted(finished.items()) if st["written"]}


def index_problems(root: "Path | str | Store", info: dict, check: ShardCheck) -> list[str]:
    """How sizes.json and (tars) shardindex.json differ from the whole shards `check` found ([] when they agree)."""
    store = open_store(root)
    want = index_entries(check.finished)
    problems = []
    sizes = read_json(store, SIZES_FILE)
    if sizes is None:
        problems.append(f"{SIZES_FILE} is missing")
    elif sizes != {name: n for name, (n, _) in want.items()}:
        problems.append(f"{SIZES_FILE} lists {len(sizes)} shard(s) / {sum(v for v in sizes.values() if isinstance(v, int))} "
                        f"samples, the whole shards are {len(want)} / {sum(n for n, _ in want.values())}")
    if info.get("format") == "webdataset":
        index = read_json(store, WIDS_INDEX)
        listed = [(e.get("url"), e.get("nsamples"), e.get("filesize")) for e in (index or {}).get("shardlist", [])
                  if isinstance(e, dict)]
        if index is None:
            problems.append(f"{WIDS_INDEX} is missing")
        elif listed != [(name, n, size) for name, (n, size) in want.items()]:
            problems.append(f"{WIDS_INDEX} lists {len(listed)} shard(s), not the {len(want)} whole ones")
    return problems


def repair(root: "Path | str | Store") -> dict:
    """What `verify --repair` does: delete the damaged shards (marker first, then their tar: a re-run of the same
    generate writes them again) and the stray tars, and rewrite the indexes over the whole shards. Returns the
    check it acted on and what it removed."""
    store = open_store(root)
    info = read_info(store)
    check = check_shards(store, info, full=True)
    for s in sorted(check.damaged):
        store.delete(stats_name(s))
        if info.get("format") == "webdataset":
            store.delete(f"{shard_name(s)}.tar")
    for name in check.stray:
        store.delete(name)
    entries = index_entries(check.finished)
    write_indexes(store, lambda: entries, wids=info.get("format") == "webdataset")
    return {"check": check, "removed": [shard_name(s) for s in sorted(check.damaged)] + list(check.stray)}


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
    it carries (seg (H, W) uint8 ids, 255 = ignore; saliency (H, W) uint8; depth (H, W) float32). A clip's: frames
    (F, H, W, 3) and labels (F, H, W)."""

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
    Every shard is checked against its marker's sha256 before any of its samples is handed out (a tar is read
    once, into a spooled buffer; a files-layout member, file by file): damage raises DamagedShard naming the
    shard (and the key, for a member that does not decode).

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
                yield from (x for x in self._tar_samples(shard) if x.key in keep)
            else:
                for rec in self.stats[shard]["samples"]:
                    if rec["key"] in keep:
                        yield self._files_sample(shard, rec["key"])

    def _damaged(self, shard: int, why: str) -> DamagedShard:
        return DamagedShard(f"{self.root}: shard {shard_name(shard)} is damaged ({why}); "
                            + REPAIR.replace("DATASET", self.root))

    def _decode(self, shard: int, key: str, members: dict[str, bytes]) -> GeneratedSample:
        try:
            clip = self.info["image_format"] == VIDEO_FORMAT
            img = members[VIDEO_FORMAT] if clip else members.get("jpg", members.get("png"))
            decode = decode_label_stack if clip else decode_label
            labels = {task: decode(task, members[label_member(task, clip)], self.scale(task)) for task in self.tasks}
            return GeneratedSample(key=key, image=decode_video(img) if clip else decode_image(img), image_bytes=img,
                                   prompt=members["txt"].decode("utf-8"), meta=json.loads(members["json"]),
                                   labels=labels)
        except Exception as e:  # noqa: BLE001 — any member that does not decode: name where
            what = f"missing member {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
            raise self._damaged(shard, f"sample {key}: {what}") from None

    def _tar_samples(self, shard: int) -> Iterator[GeneratedSample]:
        name = f"{shard_name(shard)}.tar"
        want = self.stats[shard].get("files", {}).get(name)
        # One sequential read (what an object store serves best) into a buffer that spills to disk past 256 MB,
        # hashed on the way: no sample of a shard is handed out before its bytes are known to be the marker's.
        with tempfile.SpooledTemporaryFile(max_size=256 << 20) as buf:
            h, n = hashlib.sha256(), 0
            with self.store.open(name) as f:
                while block := f.read(1 << 20):
                    h.update(block)
                    buf.write(block)
                    n += len(block)
            if want is not None and (n, h.hexdigest()) != (want["bytes"], want["sha256"]):
                raise self._damaged(shard, f"{name}: " + (f"{n} bytes, its done marker says {want['bytes']}"
                                                          if n != want["bytes"] else "sha256 differs from its done marker"))
            buf.seek(0)
            key, members = None, {}
            try:
                with tarfile.open(fileobj=buf, mode="r|") as tar:
                    for info in tar:
                        k, _, suffix = info.name.partition(".")
                        if k != key and key is not None:
                            yield self._decode(shard, key, members)
                            members = {}
                        key = k
                        members[suffix] = tar.extractfile(info).read()
            except tarfile.TarError as e:
                raise self._damaged(shard, f"{name}: {e}") from None
            if key is not None:
                yield self._decode(shard, key, members)

    def _files_sample(self, shard: int, key: str) -> GeneratedSample:
        members = {}
        image = self.info["image_format"]
        files = self.stats[shard].get("files", {})
        for suffix, (folder, ext) in files_layout().items():
            if suffix in ("jpg", "png", VIDEO_FORMAT) and suffix != image:
                continue
            rel = f"{folder}/{key}.{ext}"
            try:
                data = self.store.read_bytes(rel)
            except FileNotFoundError:
                if rel in files:
                    raise self._damaged(shard, f"{rel} is missing") from None
                continue
            if rel in files and hashlib.sha256(data).hexdigest() != files[rel]["sha256"]:
                raise self._damaged(shard, f"{rel}: sha256 differs from its done marker")
            members[suffix] = data
        return self._decode(shard, key, members)
