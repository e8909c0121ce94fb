"""Backbone features extracted once (real-image mode) and stored in shards, so head training never reruns it.

Layout: DIR/cache.json (backbone identity, capture spec, grid, image size, shard layout),
DIR/shard_00000.safetensors … and, per finished shard, DIR/shard_00000.done.json (its done marker, written
last). A shard holds, per sample: features (L, T, N, C) in the spec's store dtype (bf16 by default: FLUX's
massive activations overflow fp16) or in 8 bits with features_scale (L, T, N, 1) (`feature_codec`),
concept_maps (T, K, N) and cross_attention (T, N) when captured, dino
(E, h, w) bf16 DINOv3 maps when asked for, the labels present by task name, in the task's label dtype (seg,
saliency uint8; depth float32 metres)
and index (the sample's position in the dataset).

Host memory is bounded: shards are sized by bytes (`max_shard_bytes`, 2 GiB by default; the samples per shard
follow from one probe sample's bytes), each shard's tensors are allocated once and filled batch by batch,
and readers load the rows of one batch (safetensors slices), never a whole shard.

Several workers share one extraction without talking to each other: shard s is written by rank s mod W only,
cache.json is written (the same bytes, atomically) by every rank before any shard, and a killed extraction
resumes at the shards without a done marker. Caches written before done markers existed (a "shards" list of
finished shards in cache.json) are read as they are, and reused when finished; extending one is refused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from .._atomic import atomic_path
from ..backbones.base import Backbone
from ..backbones.dino import DinoFeatures, images_tensor
from ..capture import CaptureSpec, extract
from ..io.readers import Sample
from ..io.shards import write_json_atomic
from .._workers import STALL_S, owned_shards, shard_ranges, wait_for
from ..tasks import get as get_task
from .feature_codec import check_codec, decode, encode

MAX_SHARD_BYTES = 2 * 2**30
FORMAT = 2  # 1 (no "format" key): cache.json lists finished shards; 2: a done marker per shard
# The shard layout: kept from the first run when a cache is resumed, never part of what must match.
LAYOUT = ("format", "shard_size", "num_shards", "shards", "bytes_per_sample", "max_shard_bytes")


def shard_file(s: int) -> str:
    return f"shard_{s:05d}.safetensors"


def done_file(s: int) -> str:
    return f"shard_{s:05d}.done.json"


def check_one_size(samples: Sequence[Sample], shape: tuple[int, ...]) -> None:
    """One token grid per cache: every image must have the first one's size."""
    for x in samples:
        if x.image.shape != shape:
            raise ValueError(f"image {x.key} is {x.image.shape[1]}×{x.image.shape[0]}, the first one "
                             f"{shape[1]}×{shape[0]}: pass --size to resize and crop every image to one size")


def extract_batch(backbone: Backbone, batch: list[Sample], indices: Sequence[int], spec: CaptureSpec, seed: int,
                  labels: Sequence[str], dino: DinoFeatures | None, codec: str = "bf16") -> dict[str, torch.Tensor]:
    """Every stored tensor of `batch` (samples `indices` of the dataset), batch first, on the CPU; sample i is
    noised with seed + i; features encoded with `codec`."""
    images = [Image.fromarray(x.image) for x in batch]
    res = extract(backbone, images, spec, captions=[x.caption for x in batch], seeds=[seed + i for i in indices])
    t = encode(res.features.cpu(), codec)
    if res.concept_maps is not None:
        t["concept_maps"] = res.concept_maps.cpu()
    if res.cross_attention is not None:
        t["cross_attention"] = res.cross_attention.cpu()
    if dino is not None:
        t["dino"] = dino(images_tensor(images), res.grid).to(torch.bfloat16).cpu()
    for task in labels:
        t[task] = torch.from_numpy(np.stack([x.labels[task] for x in batch]).astype(get_task(task).label_dtype))
    t["index"] = torch.tensor(list(indices), dtype=torch.int64)
    return t


def _spec(manifest: dict) -> CaptureSpec:
    return CaptureSpec(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in manifest["spec"].items()})


def _identity(manifest: dict) -> dict:
    """What must match for a cache to be resumed: everything but the shard layout, the spec with its defaults
    (a cache written before a CaptureSpec field existed holds that field's default; before codecs, bf16)."""
    # "source" names a path: the same data read from another place is the same cache (keys_sha256 says so)
    return {k: v for k, v in manifest.items() if k not in LAYOUT and k != "source"} | {
        "spec": json.loads(json.dumps(_spec(manifest).to_dict())), "codec": manifest.get("codec", "bf16"),
        "captions_sha256": manifest.get("captions_sha256", "")}


def missing_shards(root: Path, manifest: dict) -> list[int]:
    """Shards of the cache at `root` that are not finished yet."""
    n = len(shard_ranges(manifest["count"], manifest["shard_size"]))
    if "format" not in manifest:  # format 1: cache.json lists the finished shards
        listed = set(manifest["shards"])
        return [s for s in range(n) if shard_file(s) not in listed]
    return [s for s in range(n) if not (Path(root) / done_file(s)).is_file()]


def finished_cache(root: Path, expect: dict) -> bool:
    """Whether `root` holds a finished cache whose cache.json agrees with `expect` (JSON-shaped, any of backbone,
    spec, codec, count, keys_sha256, image_size, …) on each key: a check cheap enough to make before a backbone
    loads. `extract_dataset` makes the whole one, and refuses a cache of other inputs."""
    path = Path(root) / "cache.json"
    if not path.is_file():
        return False
    manifest = json.loads(path.read_text())
    if missing_shards(root, manifest):
        return False
    have = _identity(manifest)
    return all(have.get(k) == v for k, v in expect.items())


def extract_dataset(backbone: Backbone, data: str, out: Path, tasks: Sequence[str], *, split: str | None = None,
                    size: int | None = None, captions: Path | None = None, cross_attention: bool = False,
                    blocks: str = "feature", spec: CaptureSpec | None = None, **build) -> int:
    """A dataset in its release layout (`io.datasets.open_dataset`: "voc:PATH", "folder:PATH", …) into a
    resumable feature cache capturing what heads of `tasks` read (their paper concept sets, optionally the
    averaged cross-attention, the features of `blocks`), or exactly `spec` (what one trained head reads:
    `head_spec`); `build` goes to `build_cache` (batch and shard sizes, seed, DINOv3, this worker's rank).
    Returns the dataset's sample count."""
    from ..io.datasets import open_dataset

    ds = open_dataset(data, split=split, size=size, captions=captions)
    build_cache(backbone, ds, spec or dataset_spec(tasks, cross_attention, blocks), out,
                source=_source(data, split), captions=captions_digest(captions), **build)
    return len(ds)


def head_spec(meta) -> CaptureSpec:
    """What a trained head reads (its checkpoint's HeadMeta): its layers, sigmas, concepts, blocks and, as its
    side needs, the averaged cross-attention, stored on the CPU as a cache keeps them."""
    from ..heads.inputs import reads_cross

    return CaptureSpec(layers=tuple(meta.layers), sigmas=tuple(meta.sigmas), concepts=tuple(meta.concepts),
                       blocks=meta.blocks, cross_attention=reads_cross(meta.side), store_device="cpu")


def open_live(backbone: Backbone, data: str, tasks: Sequence[str], *, split: str | None = None,
              size: int | None = None, captions: Path | None = None, cross_attention: bool = False,
              blocks: str = "feature", **live) -> "LiveFeatures":
    """The dataset `extract_dataset` would cache, as a `LiveFeatures` source (`live`: seed, dino, batch size)."""
    from ..io.datasets import open_dataset

    ds = open_dataset(data, split=split, size=size, captions=captions)
    return LiveFeatures(backbone, ds, dataset_spec(tasks, cross_attention, blocks),
                        source=_source(data, split), **live)


def captions_digest(path: Path | None) -> str:
    """What a cache records of the captions its images were conditioned on (the file's sha256; "" for none): the
    features depend on them, so a cache made with other captions is another cache."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16] if path is not None else ""


def _source(data: str, split: str | None) -> str:
    """What a head records as its training or evaluation data: "voc:/data/VOC2012 train_aug"."""
    return data + (f" {split}" if split else "")


def dataset_spec(tasks: Sequence[str], cross_attention: bool, blocks: str) -> CaptureSpec:
    """What heads of `tasks` read: their paper concept sets, optionally the averaged cross-attention."""
    return CaptureSpec.for_tasks(tasks, cross_attention=cross_attention, store_device="cpu", blocks=blocks)


def source_manifest(backbone: Backbone, spec: CaptureSpec, image_size: tuple[int, int], *, count: int,
                    labels: Sequence[str], classes: Sequence[str] = (), palette: Sequence = (),
                    dino: DinoFeatures | None = None, **extra) -> dict:
    """What a feature source (a cache, live extraction, a generation run) records, JSON-shaped: backbone identity,
    capture spec, token grid and layers, image size (H, W), sample count, label tasks, classes and palette, DINOv3
    identity, and `extra`."""
    h, w = image_size
    return json.loads(json.dumps({  # tuples → lists, as it will read back
        "backbone": backbone.identity(),
        "spec": spec.to_dict(),
        "grid": list(backbone.token_grid(h, w)),
        "layers": list(spec.layers if spec.layers is not None else backbone.default_layers(blocks=spec.blocks)),
        "image_size": [h, w],
        "count": count,
        "labels": list(labels),
        "classes": list(classes),
        "palette": list(palette),
        "dino": dino.identity() if dino is not None else {},
        **extra,
    }))


def _manifest(backbone: Backbone, samples: Sequence[Sample], spec: CaptureSpec, seed: int,
              dino: DinoFeatures | None, codec: str) -> dict:
    """A dataset's `source_manifest`: image size and labels are the first sample's."""
    keys = samples.keys if hasattr(samples, "keys") else [x.key for x in samples]  # datasets load lazily
    first = samples[0]
    return source_manifest(backbone, spec, first.image.shape[:2], count=len(samples),
                           labels=[t for t in first.labels if get_task(t).trained],
                           classes=getattr(samples, "classes", []), palette=getattr(samples, "palette", []), dino=dino,
                           keys_sha256=keys_digest(keys), seed=seed, codec=codec)


def keys_digest(keys: Sequence[str]) -> str:
    """What a cache records of its samples' keys (cache.json "keys_sha256")."""
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


def build_cache(backbone: Backbone, samples: Sequence[Sample], spec: CaptureSpec, out: Path, *,
                shard_size: int | None = None, max_shard_bytes: int = MAX_SHARD_BYTES, batch_size: int = 16,
                seed: int = 0, on_batch: Callable[[int], None] | None = None, dino: DinoFeatures | None = None,
                rank: int = 0, world_size: int = 1, codec: str = "bf16", source: str = "", captions: str = "") -> Path:
    """Extract features of this worker's shards of `samples` into `out` (resumable: finished shards are kept).

    Args:
        samples: any sequence of Sample; a dataset reader (with a `keys` list) is read lazily, batch by batch.
        shard_size: at most this many samples per shard (None: as many as `max_shard_bytes` holds).
        max_shard_bytes: tensor bytes per shard; the samples per shard follow from one probe sample (extracted
            once, before any shard, when the folder has no cache.json yet).
        rank, world_size: this worker writes shards s ≡ rank (mod world_size) only; run every rank on the same
            folder (in any order, at once or not) for the whole cache.
        codec: how features are stored (`feature_codec`: "bf16" as captured, or "int8" / "fp8" with a scale per
            token, half the bytes); readers decode them.
        source: where the samples come from ("voc:/data/VOC2012 val"), recorded for the heads trained on it.
        captions: `captions_digest` of the captions file the samples' captions come from ("": their own); another
            one makes another cache.

    Noise seeds are seed + sample index and batches start at shard starts, so a cache is reproducible whatever
    the number of workers (byte for byte on one device type) and, within rounding, the batch size. With `dino`,
    the DINOv3 maps of every image are stored too (MMDiff §3.3's optional features).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"worker rank {rank} is not in 0…{world_size - 1}")
    if (shard_size is not None and shard_size < 1) or max_shard_bytes < 1 or batch_size < 1:
        raise ValueError("shard_size, max_shard_bytes and batch_size must be ≥ 1")
    check_codec(codec)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "cache.json"
    manifest = (_manifest(backbone, samples, spec, seed, dino, codec) | ({"source": source} if source else {})
                | ({"captions_sha256": captions} if captions else {}))
    first = samples[0]
    labels = manifest["labels"]
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if _identity(old) != _identity(manifest):
            raise ValueError(f"{out} holds a feature cache of other data or settings; use a new folder")
        if "format" not in old:
            if missing_shards(out, old):
                raise ValueError(f"{out} holds an unfinished feature cache of an older mmdiff-gen (no done markers): "
                                 "extract into a new folder")
            return out  # finished: read as it is
        manifest = old  # its shard layout is kept, whatever this run's shard options
    else:
        probe = extract_batch(backbone, [first], range(1), spec, seed, labels, dino, codec)
        per_sample = sum(v[0].numel() * v.element_size() for v in probe.values())
        n = max(1, max_shard_bytes // per_sample)
        n = min(n, shard_size) if shard_size is not None else n
        num = len(shard_ranges(len(samples), n))
        manifest.update(format=FORMAT, shard_size=n, num_shards=num, shards=[shard_file(s) for s in range(num)],
                        bytes_per_sample=per_sample, max_shard_bytes=max_shard_bytes)
        write_json_atomic(manifest_path, manifest)  # every rank writes the same bytes
    ranges = shard_ranges(manifest["count"], manifest["shard_size"])
    for s in owned_shards(len(ranges), rank, world_size):
        if not (out / done_file(s)).is_file():
            _write_shard(backbone, samples, ranges[s], spec, out, s, seed=seed, labels=labels, dino=dino,
                         batch_size=batch_size, shape=first.image.shape, on_batch=on_batch, codec=codec)
    return out


def _write_shard(backbone: Backbone, samples: Sequence[Sample], rows: range, spec: CaptureSpec, out: Path, s: int, *,
                 seed: int, labels: Sequence[str], dino: DinoFeatures | None, batch_size: int,
                 shape: tuple[int, ...], on_batch: Callable[[int], None] | None, codec: str) -> None:
    """Shard s: its tensors allocated once at the first batch, filled batch by batch, written then renamed, then
    its done marker. Peak host memory: one shard plus one batch."""
    name = shard_file(s)
    for stale in out.glob(f".{name}.*.tmp"):  # a killed run's partial file; only this shard's owner writes it
        stale.unlink(missing_ok=True)
    shard: dict[str, torch.Tensor] = {}
    for b in range(rows.start, rows.stop, batch_size):
        idx = range(b, min(b + batch_size, rows.stop))
        batch = [samples[i] for i in idx]
        check_one_size(batch, shape)
        t = extract_batch(backbone, batch, idx, spec, seed, labels, dino, codec)
        if not shard:
            shard = {k: torch.empty((len(rows), *v.shape[1:]), dtype=v.dtype) for k, v in t.items()}
        for k, v in t.items():
            shard[k][b - rows.start : b - rows.start + len(idx)] = v
        del t, batch
        if on_batch is not None:
            on_batch(len(idx))
    with atomic_path(out / name) as tmp:  # on disk before its done marker vouches for it
        save_file(shard, str(tmp))  # 0.8 writes from the tensors; older releases copy them first (safetensors#458)
    write_json_atomic(out / done_file(s), {"shard": name, "samples": len(rows), "bytes": (out / name).stat().st_size})


def wait_for_cache(root: Path, *, stall_s: float = STALL_S, poll_s: float = 2.0) -> None:
    """Block until every shard of the cache at `root` is finished (by whichever workers write them)."""
    manifest = json.loads((Path(root) / "cache.json").read_text())
    total = len(shard_ranges(manifest["count"], manifest["shard_size"]))
    wait_for(lambda: total - len(missing_shards(root, manifest)), total, f"shards of {root}",
             stall_s=stall_s, poll_s=poll_s)


class FeatureSource:
    """A feature source (a cache, live extraction, a generation run): what training and evaluation read of it
    besides its batches, all from its manifest; each kind adds `batches`."""

    manifest: dict
    record: dict  # what a head trained on it records as its training data

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
        return _spec(self.manifest)

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def num_batches(self, batch_size: int, world_size: int = 1) -> int:
        """Batches each of `world_size` ranks gets from `batches` (the same for every rank)."""
        return num_batches(len(self), batch_size, world_size)


class FeatureCache(FeatureSource):
    """Reads a finished cache: metadata plus batches for training and evaluation, one batch's rows at a time."""

    def __init__(self, root: Path):
        self.root = Path(root)
        path = self.root / "cache.json"
        if not path.is_file():
            raise FileNotFoundError(f"{self.root} has no cache.json: not a feature cache")
        self.manifest = json.loads(path.read_text())
        self.record = {"cache": str(self.root), "codec": self.manifest.get("codec", "bf16")} | (
            {"data": self.manifest["source"]} if "source" in self.manifest else {})
        self.ranges = shard_ranges(self.manifest["count"], self.manifest["shard_size"])
        missing = missing_shards(self.root, self.manifest)
        if missing:
            raise ValueError(f"{self.root} is unfinished ({len(self.ranges) - len(missing)}/{len(self.ranges)} "
                             "shards): re-run the extraction (every worker) to complete it")

    def batches(self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None,
                rank: int = 0, world_size: int = 1, device: torch.device | str | None = None, skip: int = 0
                ) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of whole samples on `device` (default: the CPU), features decoded to the spec's store dtype
        there (8-bit caches cross the bus in 8 bits); with `shuffle`, shards in random order and samples shuffled
        within.

        With `world_size` ranks (each passing a generator in the same state), global batch k is the next
        batch_size × world_size samples of one order and rank r gets its r-th part: every rank gets the same
        number of equal-sized batches (`num_batches`; at the end, each gets an equal share of what is left and
        fewer than world_size samples are dropped), reads only its own rows, and the ranks together see the
        single-process batches of batch_size × world_size. The first `skip` batches are left out unread (a
        resumed epoch).
        """
        reader = _Rows(self.root)
        dtype = self.spec.torch_store_dtype
        for picks in batch_picks(self.ranges, batch_size, shuffle, generator, rank, world_size, skip):
            rows = reader.read(picks)
            yield decode({k: v.to(device) for k, v in rows.items()} if device is not None else rows, dtype)


def joined(parts: list[dict[str, torch.Tensor]], device: torch.device | str | None) -> dict[str, torch.Tensor]:
    """One batch from the parts it was produced in (row-wise), on `device` (None: where they are)."""
    rows = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return {k: v.to(device) for k, v in rows.items()} if device is not None else rows


def num_batches(count: int, batch_size: int, world_size: int = 1) -> int:
    """Batches each of `world_size` ranks gets from `batch_picks` over `count` samples (the same for every rank)."""
    full, rest = divmod(count, batch_size * world_size)
    return full + (rest // world_size > 0)


def batch_picks(ranges: list[range], batch_size: int, shuffle: bool, generator: torch.Generator | None, rank: int,
                world_size: int, skip: int = 0) -> Iterator[list[tuple[int, int]]]:
    """This rank's (shard, row) picks of each batch (`FeatureCache.batches` says how they are chosen)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0…{world_size - 1}")
    # One order for all ranks: the same generator calls, in the same order, on every rank.
    shards = torch.randperm(len(ranges), generator=generator).tolist() if shuffle else range(len(ranges))
    order: list[tuple[int, int]] = []
    for s in shards:
        n = len(ranges[s])
        order += [(s, i) for i in (torch.randperm(n, generator=generator).tolist() if shuffle else range(n))]
    step = batch_size * world_size
    for start in range(skip * step, len(order), step):
        chunk = order[start : start + step]
        per = len(chunk) // world_size
        if per == 0:
            break
        yield chunk[rank * per : (rank + 1) * per]


class LiveFeatures(FeatureSource):
    """A dataset read as a feature cache would be, its features extracted for each batch as it is read (`train
    --no-cache`: no scratch disk, one backbone forward per batch and epoch). Same interface as FeatureCache, and
    the same tensors as a one-shard bf16 cache of the same samples and seed (noise seed + sample index).

    Args:
        backbone: the loaded backbone (kept for the whole run).
        samples: a dataset (`io.datasets.open_dataset`) or any sequence of Sample of one image size.
        spec: what to capture (as `extract_dataset` builds it).
        source: what the head file records as its training data (e.g. "voc:/data/VOC2012 train_aug").
        seed: noise seed base.
        dino: DINOv3 maps too (MMDiff §3.3).
        extract_batch_size: images per backbone forward (× the number of sigmas): bounds activation memory
            whatever the training batch size.
    """

    def __init__(self, backbone: Backbone, samples: Sequence[Sample], spec: CaptureSpec, *, source: str,
                 seed: int = 0, dino: DinoFeatures | None = None, extract_batch_size: int = 4):
        if extract_batch_size < 1:
            raise ValueError("extract_batch_size must be ≥ 1")
        self.backbone, self.samples, self.dino, self.seed = backbone, samples, dino, seed
        self.extract_batch_size, self.root = extract_batch_size, source
        self.manifest = _manifest(backbone, samples, spec, seed, dino, "bf16")
        self.shape = samples[0].image.shape
        self.record = {"data": source, "features": "extracted per batch (no cache)"}

    def batches(self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None,
                rank: int = 0, world_size: int = 1, device: torch.device | str | None = None, skip: int = 0
                ) -> Iterator[dict[str, torch.Tensor]]:
        """As `FeatureCache.batches`, over one shard holding every sample."""
        labels, spec = self.manifest["labels"], self.spec
        for picks in batch_picks([range(len(self))], batch_size, shuffle, generator, rank, world_size, skip):
            idx = [i for _, i in picks]
            parts = []
            for a in range(0, len(idx), self.extract_batch_size):
                chunk = idx[a : a + self.extract_batch_size]
                batch = [self.samples[i] for i in chunk]
                check_one_size(batch, self.shape)
                parts.append(extract_batch(self.backbone, batch, chunk, spec, self.seed, labels, self.dino))
            yield joined(parts, device)


class _Rows:
    """Reads (shard, row) lists through safetensors slices, holding one shard open at a time."""

    def __init__(self, root: Path):
        self.root = root
        self.open_shard, self.handle = -1, None

    def _shard(self, s: int):
        if s != self.open_shard:
            self.handle = None  # closes the previous shard's mapping
            self.handle = safe_open(str(self.root / shard_file(s)), framework="pt")
            self.open_shard = s
        return self.handle

    def read(self, picks: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        parts: dict[str, list[torch.Tensor]] = {}
        i = 0
        while i < len(picks):  # a run of consecutive rows of one shard is one slice
            s, a = picks[i]
            j = i + 1
            while j < len(picks) and picks[j] == (s, a + j - i):
                j += 1
            f = self._shard(s)
            for k in f.keys():  # noqa: SIM118 — a safetensors handle, not a dict
                parts.setdefault(k, []).append(f.get_slice(k)[a : a + j - i])
            i = j
        return {k: v[0] if len(v) == 1 else torch.cat(v) for k, v in parts.items()}
