"""What open_dataset adds on top of a reader: one square size for every sample, and captions from a JSONL file."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from ...tasks import get as get_task
from ..readers import Sample
from ._read import Reader

# Resampling per task kind: class ids never get values that were not stored (nearest), a positive map's
# 0 = invalid is never averaged into a valid neighbour (nearest), probabilities are smooth (bilinear).
_R = Image.Resampling
_RESAMPLE = {"classes": _R.NEAREST, "probability": _R.BILINEAR, "positive": _R.NEAREST}


def fit_square(sample: Sample, size: int) -> Sample:
    """Resize so the shorter side is `size`, then center-crop to size × size (every field alike).

    The feature cache needs one token grid per dataset; real datasets mix sizes and orientations.
    """
    h, w = sample.image.shape[:2]
    if h <= w:  # the shorter side is exactly `size`, whatever the rounding of the longer one
        nh, nw = size, max(size, round(w * size / h))
    else:
        nh, nw = max(size, round(h * size / w)), size
    top, left = (nh - size) // 2, (nw - size) // 2
    def fit(array: np.ndarray, resample) -> np.ndarray:
        # uint8 (H, W, 3) → RGB, uint8 (H, W) → L, float32 (H, W) → F: PIL resizes each natively
        im = Image.fromarray(np.ascontiguousarray(array)).resize((nw, nh), resample)
        return np.ascontiguousarray(np.asarray(im)[top:top + size, left:left + size])  # (size, size[, 3])

    return replace(sample, image=fit(sample.image, _R.BICUBIC),
                   labels={t: fit(a, _RESAMPLE[get_task(t).kind]) for t, a in sample.labels.items()})


def read_captions(path: Path) -> dict[str, str]:
    """JSONL of `{"key": ..., "caption": ...}` lines → {key: caption}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such captions file (expected JSONL lines of key and caption)")
    captions = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            captions[str(row["key"])] = str(row["caption"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path}:{n}: expected a JSON object with \"key\" and \"caption\"") from None
    return captions


class Prepared(Reader):
    """A reader seen through `size` and `captions`; same interface (keys, classes, palette, len, items).

    Args:
        base: any reader.
        size: side of the square every sample is resized and cropped to (None: as stored).
        captions: {key: caption}; a key without one keeps the reader's caption ("" for public datasets).
    """

    def __init__(self, base, *, size: int | None = None, captions: dict[str, str] | None = None):
        if size is not None and size < 1:
            raise ValueError(f"size must be a positive number of pixels, got {size}")
        self.base, self.size, self.captions = base, size, captions or {}
        self.keys, self.classes, self.palette = base.keys, base.classes, base.palette

    def __getitem__(self, i: int) -> Sample:
        sample = self.base[i]
        if sample.key in self.captions:
            sample = replace(sample, caption=self.captions[sample.key])
        return fit_square(sample, self.size) if self.size else sample
