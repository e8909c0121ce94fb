"""Prompt fidelity of the toy backbone: does the oracle find every prompted object, class and colour?

For fresh random captions (seeds never used in training), generate one image each, segment it with
the oracle, and check every prompted object in its position's third of the image: enough pixels of
the prompted class, whose mean colour is nearest to the prompted colour among the world's colours.
The same judge on renders and on VAE reconstructions of renders gives its ceilings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .world import CLASSES, COLORS, POSITIONS, SIZE, Thing

MIN_PIXELS = 30  # a small object covers ~150–250 px; fewer than this is not a drawn object
CAPTION_SEED = 7_000_000  # caption layouts for fidelity checks: far from every training seed
_BANDS = {p: (int(SIZE * lo), int(SIZE * hi)) for p, (lo, hi) in {"left": (0, 1 / 3), "center": (1 / 3, 2 / 3),
                                                                    "right": (2 / 3, 1)}.items()}
_COLOR_NAMES = list(COLORS)
_COLOR_RGB = np.array([COLORS[c] for c in _COLOR_NAMES], np.float32)
assert set(_BANDS) == set(POSITIONS)


@dataclass(frozen=True)
class Judgement:
    found: list[bool]  # per prompted object
    colors: list[str | None]  # the colour read for each object (None: class not found)

    @property
    def ok(self) -> bool:
        return all(self.found)


def judge(image: np.ndarray, seg: np.ndarray, things: list[Thing]) -> Judgement:
    """Check each prompted object against the oracle's segmentation of `image` (H, W, 3 uint8)."""
    found, colors = [], []
    for t in things:
        lo, hi = _BANDS[t.position]
        mask = np.zeros(seg.shape, bool)
        mask[:, lo:hi] = seg[:, lo:hi] == CLASSES.index(t.shape)
        if mask.sum() < MIN_PIXELS:
            found.append(False)
            colors.append(None)
            continue
        mean = image[mask].astype(np.float32).mean(0)
        name = _COLOR_NAMES[int(np.argmin(((_COLOR_RGB - mean) ** 2).sum(1)))]
        found.append(name == t.color)
        colors.append(name)
    return Judgement(found, colors)


def fidelity(images: np.ndarray, segs: np.ndarray, layouts: list[list[Thing]]) -> float:
    """Fraction of images whose every prompted object is found with its class and colour."""
    return float(np.mean([judge(im, sg, th).ok for im, sg, th in zip(images, segs, layouts)]))


def found_per_class(images: np.ndarray, segs: np.ndarray, layouts: list[list[Thing]]) -> dict[str, float]:
    """Per prompted class: the fraction of its prompted objects found with that class and colour."""
    hits: dict[str, list[bool]] = {}
    for im, sg, th in zip(images, segs, layouts):
        for t, ok in zip(th, judge(im, sg, th).found):
            hits.setdefault(t.shape, []).append(ok)
    return {c: float(np.mean(hits[c])) for c in CLASSES[1:] if c in hits}
