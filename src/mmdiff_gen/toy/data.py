"""Rendered training scenes held as arrays, cached on disk so every phase renders them once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .._atomic import atomic_path
from .world import CLASSES, render_scene


@dataclass
class SceneArrays:
    """N scenes: images (N, 64, 64, 3) uint8, seg (N, 64, 64) uint8, depth (N, 64, 64) float16 metres, captions."""

    images: np.ndarray
    seg: np.ndarray
    depth: np.ndarray
    captions: list[str]

    def __len__(self) -> int:
        return len(self.captions)


def render_arrays(start: int, n: int) -> SceneArrays:
    scenes = [render_scene(s) for s in range(start, start + n)]
    return SceneArrays(
        images=np.stack([s.image for s in scenes]),
        seg=np.stack([s.seg for s in scenes]),
        depth=np.stack([s.depth for s in scenes]).astype(np.float16),
        captions=[s.caption for s in scenes],
    )


def load_or_render(cache: Path, start: int, n: int) -> SceneArrays:
    """Scenes start … start + n − 1, from `cache` (.npz) when it holds exactly those."""
    cache = Path(cache)
    if cache.is_file():
        z = np.load(cache, allow_pickle=False)
        if int(z["start"]) == start and len(z["captions"]) == n:
            return SceneArrays(z["images"], z["seg"], z["depth"], [str(c) for c in z["captions"]])
    arrays = render_arrays(start, n)
    cache.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache) as tmp, open(tmp, "wb") as f:  # a file object: savez adds no suffix
        np.savez(f, images=arrays.images, seg=arrays.seg, depth=arrays.depth, captions=np.array(arrays.captions),
                 start=np.array(start))
    return arrays


def boundary_mask(seg: np.ndarray, radius: int = 1) -> np.ndarray:
    """(N, H, W) bool: pixels whose (2·radius + 1)² neighbourhood holds another class."""
    r = radius
    pad = np.pad(seg, ((0, 0), (r, r), (r, r)), mode="edge")
    edge = np.zeros(seg.shape, bool)
    h, w = seg.shape[1:]
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            edge |= pad[:, dy : dy + h, dx : dx + w] != seg
    return edge


def boundary_weight(seg: np.ndarray, extra: float) -> np.ndarray:
    """(N, H, W) float32: 1 + extra on pixels whose 3×3 neighbourhood holds another class."""
    return 1.0 + extra * boundary_mask(seg, 1).astype(np.float32)


def class_fractions(seg: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, H, W) class ids → (B, classes, h, w): the fraction of each cell's pixels in each class."""
    one_hot = F.one_hot(seg.long(), len(CLASSES)).permute(0, 3, 1, 2).float()
    return F.adaptive_avg_pool2d(one_hot, (h, w))
