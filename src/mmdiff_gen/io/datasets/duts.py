"""DUTS salient-object detection (DUTS-TR: 10,553 training images, DUTS-TE: 5,019 test images)."""

from __future__ import annotations

from pathlib import Path

from ..readers import Sample
from ._read import Reader, need_dir, read_gray, read_rgb

_SPLIT_NAMES = {"tr": "TR", "train": "TR", "te": "TE", "test": "TE"}
_IMAGE_EXTS = (".jpg", ".jpeg", ".png")


class DUTSDataset(Reader):
    """DUTS in its release layout: `DUTS-<S>/DUTS-<S>-Image/<name>.jpg` with `DUTS-<S>-Mask/<name>.png`.

    Samples carry `saliency` only: (H, W) uint8 as stored (0 / 255 in the release; masks saved as RGB or
    resaved with in-between values are read as luminance, not thresholded). Keys are the file stems.

    Args:
        root: the folder holding DUTS-TR/ and/or DUTS-TE/, or one of those folders itself.
        split: TR or TE (any case; also train / test). None: the folder given, else TR.
    """

    def __init__(self, root: Path, split: str | None = None):
        root = need_dir(Path(root), "DUTS-TR/ or DUTS-TE/, or one of them")
        own = next((s for s in ("TR", "TE") if (root / f"DUTS-{s}-Image").is_dir()), None)  # root is DUTS-TR/
        if split is None:
            self.split = own or "TR"
        elif split.lower() in _SPLIT_NAMES:
            self.split = _SPLIT_NAMES[split.lower()]
        else:
            raise ValueError(f"unknown DUTS split {split!r}: expected TR or TE (train / test)")
        if own is not None and own != self.split:
            raise ValueError(f"{root} is DUTS-{own}: it has no {self.split} split")
        folder = root if own else root / f"DUTS-{self.split}"
        self.image_dir = need_dir(folder / f"DUTS-{self.split}-Image", f"the DUTS-{self.split} images")
        self.mask_dir = need_dir(folder / f"DUTS-{self.split}-Mask", f"the DUTS-{self.split} masks")
        self._images = sorted(p for p in self.image_dir.iterdir() if p.suffix.lower() in _IMAGE_EXTS)
        if not self._images:
            raise FileNotFoundError(f"{self.image_dir} holds no .jpg or .png images")
        self.keys = [p.stem for p in self._images]
        masks = {p.stem for p in self.mask_dir.glob("*.png")}
        missing = next((k for k in self.keys if k not in masks), None)
        if missing is not None:
            raise FileNotFoundError(f"{self.mask_dir / (missing + '.png')}: no mask for image {missing}")
        self.classes, self.palette = [], []

    def __getitem__(self, i: int) -> Sample:
        key = self.keys[i]
        return Sample(key=key, image=read_rgb(self._images[i]), labels={"saliency": read_gray(self.mask_dir / f"{key}.png")})
