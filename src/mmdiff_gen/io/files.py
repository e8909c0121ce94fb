"""The `files` layout: images/, seg/, saliency/, depth/ folders of PNGs plus meta.jsonl, one key per sample.

seg: 8-bit single-channel class ids (255 = ignore); saliency: 8-bit 0–255; depth: 16-bit PNG in
millimetres (NYU convention; 0 = invalid). Every file is written then renamed, so a reader never
sees half a file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from .members import decode_depth, encode_depth, encode_gray, encode_image
from .shards import write_bytes_atomic

FOLDERS = {"image": "images", "seg": "seg", "saliency": "saliency", "depth": "depth"}


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
        write_bytes_atomic(self.root / FOLDERS["image"] / f"{key}.png", encode_image(image, "png"))
        if seg is not None:
            write_bytes_atomic(self.root / FOLDERS["seg"] / f"{key}.png", encode_gray(seg))
        if saliency is not None:
            write_bytes_atomic(self.root / FOLDERS["saliency"] / f"{key}.png", encode_gray(saliency))
        if depth is not None:
            write_bytes_atomic(self.root / FOLDERS["depth"] / f"{key}.png", encode_depth(depth))
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
        out["depth"] = decode_depth(p.read_bytes())
    return out
