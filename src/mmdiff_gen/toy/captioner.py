"""The toy world's stand-in for a VLM captioner: the oracle's reading of a render, phrased in the world's own grammar.

Real images are captioned by a VLM before they are noised and conditioned on (MMDiff §4.4,
`backbones/captioner.py`); on the toy world the oracle reads a render's objects from pixels and
`world.caption_of` phrases them, so `mmdiff-gen caption --model oracle` writes what a perfect captioner of
this world would, up to the oracle's errors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..io.coco import components
from .oracle import ORACLE_FILE, Oracle
from .world import CLASSES, COLORS, MIN_VISIBLE, POSITIONS, SHADE, SHAPES, SIZE, SIZES, Thing, caption_of, shape_mask

ORACLE = "oracle"  # the --model short name

_RGB = np.array(list(COLORS.values()), np.float32)  # (8, 3), in COLORS' order
_NAMES = tuple(COLORS)


def _extent(mask: np.ndarray) -> int:
    ys, xs = np.nonzero(mask)
    return int(max(ys.max() - ys.min(), xs.max() - xs.min())) + 1


def _size_thresholds() -> dict[str, float]:
    """shape → the bounding-box extent (pixels, the longer side) between the world's small and large drawings of it:
    midway between its largest small and smallest large extent. Per shape, because a square's margin and a star's
    points make its extent shorter than its side (square: small ≤ 18, large ≥ 24)."""
    (s_lo, s_hi), (l_lo, l_hi) = SIZES["small"], SIZES["large"]
    return {shape: (max(_extent(shape_mask(shape, k)) for k in range(s_lo, s_hi + 1))
                    + min(_extent(shape_mask(shape, k)) for k in range(l_lo, l_hi + 1))) / 2 for shape in SHAPES}


SIZE_THRESHOLD = _size_thresholds()
# A region smaller than half of the smallest object the world shows (its least visible fraction of a small
# star, 105 px × 0.5) is a speck of misread pixels, not an object.
MIN_AREA = MIN_VISIBLE * min(int(shape_mask(s, SIZES["small"][0]).sum()) for s in SHAPES) / 2


def nearest_colors(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) RGB → (...) indices into world.COLORS: the colour c minimising |rgb − s·c| over the renderer's
    shading factors s ∈ SHADE (its best s is the projection of rgb on c, clipped), so an object's shaded bottom
    reads as its colour (a dark yellow is nearer orange by plain distance)."""
    p = np.asarray(rgb, np.float32).reshape(-1, 1, 3)  # (P, 1, 3)
    s = np.clip((p * _RGB).sum(-1) / (_RGB ** 2).sum(-1), *SHADE)  # (P, 8)
    dist = ((p - s[..., None] * _RGB) ** 2).sum(-1)  # (P, 8)
    return dist.argmin(1).reshape(np.shape(rgb)[:-1])


def read_things(image: np.ndarray, seg: np.ndarray, depth: np.ndarray | None = None) -> list[Thing]:
    """The objects a segmentation shows, as the world describes them.

    Args:
        image: (H, W, 3) uint8 render.
        seg: (H, W) class ids (world.CLASSES; 0 = background), e.g. the oracle's prediction.
        depth: (H, W) metres, optional (each object's depth is its region's mean; 0 without it).

    An object is an 8-connected region of one class and one colour (each pixel's nearest world colour): split by
    colour, two touching objects of one class stay two. Regions under MIN_AREA pixels are specks; the world puts
    at most one object at each position, so the largest region at a position is its object. Each object's colour
    is the nearest world colour to its region's mean pixel, its size small / large from its extent against its
    shape's threshold, its position the world position nearest its centroid column.
    """
    by_colour = seg.astype(np.int64) * len(_NAMES) + nearest_colors(image)  # (H, W) one id per (class, colour)
    by_colour[seg == 0] = 0
    ids = {int(v) for v in np.unique(by_colour) if v and v // len(_NAMES) < len(CLASSES)}  # not 255 = ignore
    centres = np.array(list(POSITIONS.values())) * seg.shape[1]  # (3,) x of each position, pixels
    found: dict[str, tuple[int, Thing]] = {}  # position → (area, thing)
    for cid, area, mask in components(by_colour, ids):
        if area < MIN_AREA:
            continue
        ys, xs = np.nonzero(mask)
        cx = float(xs.mean()) + 0.5  # pixel centres
        position = list(POSITIONS)[int(np.abs(centres - cx).argmin())]
        if position in found and found[position][0] >= area:
            continue
        shape = CLASSES[cid // len(_NAMES)]
        extent = _extent(mask)
        found[position] = (area, Thing(
            shape=shape, color=_NAMES[int(nearest_colors(image[mask].astype(np.float32).mean(0)))],
            size="large" if extent > SIZE_THRESHOLD[shape] else "small", position=position, side=extent, cx=cx,
            bottom=int(ys.max()), depth=float(depth[mask].mean()) if depth is not None else 0.0))
    return [thing for _, thing in found.values()]


def read_caption(image: np.ndarray, seg: np.ndarray, depth: np.ndarray | None = None) -> str:
    """The caption of the objects `read_things` finds, in world.caption_of's words and left-to-right order
    ("" when it finds none)."""
    things = read_things(image, seg, depth)
    return caption_of(things) if things else ""


class OracleCaptioner:
    """The toy oracle as a captioner for `jobs.caption`: (64, 64, 3) renders → captions in the world's grammar.

    Args:
        oracle: the pixel U-Net (toy/oracle.py), placed by the caller.
        weights_id: a fingerprint of its weights file, recorded beside the captions it writes.
    """

    def __init__(self, oracle: Oracle, weights_id: str = ""):
        self.oracle = oracle.eval().requires_grad_(False)
        self.weights_id = weights_id

    @staticmethod
    def describe(path: Path = ORACLE_FILE) -> dict:
        """The identity of the oracle in `path` (what `identity()` returns once loaded), read without loading it."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no toy oracle (train it with `mmdiff-gen toy train --phases oracle`)")
        return {"model": ORACLE, "weights": hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]}

    @classmethod
    def load(cls, path: Path = ORACLE_FILE, device: str = "cpu") -> "OracleCaptioner":
        ident = cls.describe(path)
        return cls(Oracle.from_checkpoint(Path(path)).to(device), weights_id=ident["weights"])

    def identity(self) -> dict:
        return {"model": ORACLE, "weights": self.weights_id}

    def __call__(self, images: Sequence[np.ndarray]) -> list[str]:
        """uint8 (64, 64, 3) renders → one caption each."""
        for im in images:
            if im.shape != (SIZE, SIZE, 3):
                raise ValueError(f"the toy oracle reads {SIZE}×{SIZE} RGB renders, got an image of shape {im.shape}")
        pred = self.oracle.predict(np.stack(images))  # seg (N, H, W) ids, depth (N, H, W) metres
        return [read_caption(im, seg, dep) for im, seg, dep in zip(images, pred["seg"], pred["depth"])]
