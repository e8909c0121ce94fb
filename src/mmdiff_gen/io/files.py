"""The `files` layout: images/, seg/, saliency/, depth/ folders of PNGs plus meta.jsonl, one key per sample.

seg: 8-bit single-channel class ids (255 = ignore); saliency: 8-bit 0–255; depth: 16-bit PNG in
millimetres (NYU convention; 0 = invalid). Every file is written then renamed, so a reader never
sees half a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

DEPTH_SCALE = 1000.0  # depth PNG value per metre
FOLDERS = {"image": "images", "seg": "seg", "saliency": "saliency", "depth": "depth"}


def _save_png(array: np.ndarray, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


def depth_to_png(depth_m: np.ndarray) -> np.ndarray:
    """Metres (float) → uint16 millimetres, clipped to the PNG range."""
    return np.clip(np.round(depth_m * DEPTH_SCALE), 0, 65535).astype(np.uint16)


def depth_from_png(png: np.ndarray) -> np.ndarray:
    return png.astype(np.float32) / DEPTH_SCALE


class FilesWriter:
    """Writes samples into the files layout under `root`.

    Args:
        root: output folder (created).
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        for sub in FOLDERS.values():
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._meta = open(self.root / "meta.jsonl", "a", encoding="utf-8")

    def write(self, key: str, *, image: np.ndarray, meta: dict, seg: np.ndarray | None = None,
              saliency: np.ndarray | None = None, depth: np.ndarray | None = None) -> None:
        """One sample: image (H, W, 3) uint8, seg (H, W) uint8, saliency (H, W) uint8, depth (H, W) metres."""
        _save_png(image, self.root / FOLDERS["image"] / f"{key}.png")
        if seg is not None:
            _save_png(seg.astype(np.uint8), self.root / FOLDERS["seg"] / f"{key}.png")
        if saliency is not None:
            _save_png(saliency.astype(np.uint8), self.root / FOLDERS["saliency"] / f"{key}.png")
        if depth is not None:
            _save_png(depth_to_png(depth), self.root / FOLDERS["depth"] / f"{key}.png")
        self._meta.write(json.dumps({"key": key, **meta}) + "\n")  # last: the sample is complete
        self._meta.flush()

    def close(self) -> None:
        self._meta.close()


def read_sample(root: Path, key: str) -> dict[str, np.ndarray]:
    """Lossless read of one sample of the files layout (missing modalities are left out)."""
    root = Path(root)
    out = {"image": np.asarray(Image.open(root / "images" / f"{key}.png").convert("RGB"))}
    for name in ("seg", "saliency"):
        p = root / FOLDERS[name] / f"{key}.png"
        if p.is_file():
            out[name] = np.asarray(Image.open(p))
    p = root / "depth" / f"{key}.png"
    if p.is_file():
        out["depth"] = depth_from_png(np.asarray(Image.open(p)))
    return out
