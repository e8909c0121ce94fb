"""`probe-layers`: which block's image→text attention segments best (Seg4Diff's "expert" layer).

Labelled images go through real-image mode once, recording the per-token attention of every
text-image block at every sigma; each (layer, sigma) is scored as zero-shot segmentation against
the ground truth (mIoU over the dataset, background included), at each background threshold.

Several workers split the images (batch b goes to worker b mod W) and keep confusion matrices, which add up:
each worker writes its own to a part file and worker 0 merges them, so W workers score exactly what one does.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .._atomic import atomic_path
from ..backbones.base import Backbone
from ..capture import CaptureSpec, extract
from ..heads.frames import to_frames
from ..heads.openseg import class_maps, segment
from ..train.feature_cache import check_one_size
from ..train.metrics import SegMetrics
from .._workers import STALL_S, wait_for


@dataclass
class ProbeScores:
    """Summed confusion matrices of every (layer, sigma, threshold): (L, T, R, K, K) int64, K classes.

    `named` counts samples whose caption names at least one class; `settings` identifies the run (parts of
    other runs are not merged)."""

    layers: list[int]
    sigmas: list[float]
    thresholds: list[float]
    confusion: np.ndarray
    named: int
    samples: int
    settings: str

    def __add__(self, other: ProbeScores) -> ProbeScores:
        if other.settings != self.settings:
            raise ValueError("probe parts of different runs cannot be merged")
        return ProbeScores(self.layers, self.sigmas, self.thresholds, self.confusion + other.confusion,
                           self.named + other.named, self.samples + other.samples, self.settings)

    def result(self) -> dict:
        """{"miou": array (L, T, R) of mIoU in percent, "layers", "sigmas", "thresholds", "best": {layer,
        sigma, threshold, miou}, "samples": count}."""
        if self.named == 0:
            raise ValueError("no caption names any of the classes: the probe reads the attention of the class "
                             "words (give captions with --captions)")
        meter = SegMetrics(self.confusion.shape[-1])
        miou = np.empty(self.confusion.shape[:3])
        for pos in np.ndindex(*miou.shape):
            meter.conf = self.confusion[pos]
            miou[pos] = meter.result()["miou"]
        li, ti, ri = np.unravel_index(np.nanargmax(miou), miou.shape)
        return {"miou": miou, "layers": list(self.layers), "sigmas": list(self.sigmas),
                "thresholds": list(self.thresholds),
                "best": {"layer": int(self.layers[li]), "sigma": float(self.sigmas[ti]),
                         "threshold": float(self.thresholds[ri]), "miou": float(miou[li, ti, ri])},
                "samples": self.samples}

    def save(self, path: Path) -> None:
        """Written then renamed (np.savez: no pickle)."""
        with atomic_path(Path(path)) as tmp, open(tmp, "wb") as f:  # a file object: savez adds no suffix
            np.savez(f, layers=np.array(self.layers), sigmas=np.array(self.sigmas),
                     thresholds=np.array(self.thresholds), confusion=self.confusion,
                     counts=np.array([self.named, self.samples]), settings=np.array(self.settings))

    @classmethod
    def load(cls, path: Path) -> ProbeScores:
        with np.load(path, allow_pickle=False) as z:
            return cls(z["layers"].tolist(), z["sigmas"].tolist(), z["thresholds"].tolist(), z["confusion"],
                       int(z["counts"][0]), int(z["counts"][1]), str(z["settings"]))


def probe_scores(backbone: Backbone, samples, classes: Sequence[str], *, sigmas: Sequence[float],
                 thresholds: Sequence[float] = (0.3, 0.4, 0.5, 0.6), n: int | None = None, batch_size: int = 16,
                 seed: int = 0, on_batch=None, rank: int = 0, world_size: int = 1) -> ProbeScores:
    """This worker's confusion matrices of every (attention block, sigma, threshold) on its batches of `samples`.

    Args:
        backbone: the wrapped pipeline.
        samples: a dataset reader (Sample with image, seg and a caption naming the classes present); for a video
            backbone, clips: image (F, H, W, 3), seg (F, H, W), each frame scored (the latent frames' class maps
            spread over the decoded frames as a video head's outputs are, `heads.frames.to_frames`).
        classes: class names, id i = classes[i], 0 = background.
        sigmas: the sigmas to probe.
        thresholds: background thresholds to try.
        n: use the first n samples (None: all).
        rank, world_size: this worker scores batches b ≡ rank (mod world_size) of the first n samples.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"worker rank {rank} is not in 0…{world_size - 1}")
    layers = tuple(range(len(backbone.attention_blocks)))
    spec = CaptureSpec(layers=(0,), sigmas=tuple(sigmas), text_attention_layers=layers, store_dtype="float32",
                       store_device="cpu")
    sig = spec.sigmas  # noisiest first
    count = len(samples) if n is None else min(n, len(samples))
    keys = samples.keys if hasattr(samples, "keys") else [f"{i}" for i in range(len(samples))]
    settings = json.dumps([backbone.identity(), list(classes), list(sig), list(thresholds), count, batch_size, seed,
                           hashlib.sha256("\n".join(keys[:count]).encode()).hexdigest()[:16]], sort_keys=True)
    meters = [[[SegMetrics(len(classes)) for _ in thresholds] for _ in sig] for _ in layers]
    named = done = 0  # named: samples whose caption names at least one class
    for start in range(rank * batch_size, count, batch_size * world_size):
        batch = [samples[i] for i in range(start, min(start + batch_size, count))]
        if any("seg" not in x.labels for x in batch):
            raise ValueError("probe-layers needs segmentation labels")
        check_one_size(batch, batch[0].image.shape)
        gts = [x.labels["seg"] for x in batch]
        top = max(int(np.where(g == 255, 0, g).max()) for g in gts)
        if top >= len(classes):
            raise ValueError(f"the labels hold class id {top} but {len(classes)} class names were given")
        captions = [x.caption for x in batch]
        clip = backbone.VIDEO
        images = [[Image.fromarray(f) for f in x.image] if clip else Image.fromarray(x.image) for x in batch]
        res = extract(backbone, images, spec, captions=captions, seeds=[seed + start + i for i in range(len(batch))])
        if clip:
            gts = [f for g in gts for f in g]  # every frame of every clip
        positions = backbone.class_token_positions(captions, classes)
        named += sum(bool(p) for p in positions)
        done += len(batch)
        size, grid = batch[0].image.shape[-3:-1], res.grid[-2:]
        for li in range(len(layers)):
            for ti in range(len(sig)):
                maps = class_maps(res.text_attention[:, ti, li], positions, len(classes))  # (B, K, N)
                if clip:  # (B, K, f·h·w) → (B·F, K, h·w), per decoded frame
                    maps = to_frames(maps.unflatten(2, (res.grid[0], -1)).transpose(1, 2), res.frames).flatten(0, 1)
                for ri, tau in enumerate(thresholds):
                    ids, _ = segment(maps, grid, size, tau)
                    for p, g in zip(ids.numpy(), gts):
                        meters[li][ti][ri].update(p, g)
        if on_batch is not None:
            on_batch(len(batch))
    confusion = np.array([[[m.conf for m in row] for row in layer] for layer in meters]).reshape(
        len(layers), len(sig), len(thresholds), len(classes), len(classes))
    return ProbeScores(list(layers), list(sig), list(thresholds), confusion, named, done, settings)


def probe_layers(backbone: Backbone, samples, classes: Sequence[str], *, sigmas: Sequence[float],
                 thresholds: Sequence[float] = (0.3, 0.4, 0.5, 0.6), n: int | None = None, batch_size: int = 16,
                 seed: int = 0, on_batch=None) -> dict:
    """Score every (attention block, sigma, threshold) as zero-shot segmentation on `samples` in this process
    (`ProbeScores.result()` of `probe_scores`)."""
    return probe_scores(backbone, samples, classes, sigmas=sigmas, thresholds=thresholds, n=n,
                        batch_size=batch_size, seed=seed, on_batch=on_batch).result()


def part_path(json_out: Path, rank: int, world_size: int) -> Path:
    """Where worker `rank` leaves its scores: hidden, beside the JSON table worker 0 writes."""
    json_out = Path(json_out)
    return json_out.with_name(f".{json_out.name}.part{rank}-of-{world_size}.npz")


def gather_scores(scores: ProbeScores, json_out: Path, rank: int, world_size: int, *,
                  stall_s: float = STALL_S, poll_s: float = 2.0) -> ProbeScores | None:
    """Workers 1…W-1 write their part files; worker 0 waits for them, merges and deletes them, and returns the
    sum (the others get None). A part left by an earlier run of other settings is waited past, not merged."""
    if rank != 0:
        scores.save(part_path(json_out, rank, world_size))
        return None
    paths = [part_path(json_out, r, world_size) for r in range(1, world_size)]

    def ready() -> int:
        n = 0
        for p in paths:
            try:
                n += ProbeScores.load(p).settings == scores.settings
            except (OSError, ValueError, KeyError):
                pass
        return n

    wait_for(ready, len(paths), "probe parts", stall_s=stall_s, poll_s=poll_s)
    total = scores
    for p in paths:
        total = total + ProbeScores.load(p)
        p.unlink()
    return total


def describe_layer(backbone: Backbone, index: int) -> str:
    """A human name for an attention-block index (FLUX.1 / FLUX.2: double / single, SD3 and Qwen-Image: joint)."""
    n_joint = len(backbone.joint_blocks)
    if index < n_joint:
        return f"{'double' if backbone.family in ('flux', 'flux2') else 'joint'} {index}"
    return f"single {index - n_joint}"
