"""Dataset readers: labelled images as plain numpy samples (image, and whichever labels exist)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .files import read_sample


@dataclass
class Sample:
    """One labelled image: image (H, W, 3) uint8; seg (H, W) uint8 (255 = ignore); saliency (H, W) uint8;
    depth (H, W) float32 metres (0 = invalid); caption (may be empty)."""

    key: str
    image: np.ndarray
    caption: str = ""
    seg: np.ndarray | None = None
    saliency: np.ndarray | None = None
    depth: np.ndarray | None = None


class FilesDataset:
    """The files layout (images/, seg/, saliency/, depth/, meta.jsonl), as `toy render` writes it."""

    def __init__(self, root: Path):
        self.root = Path(root)
        meta = self.root / "meta.jsonl"
        if not meta.is_file():
            raise FileNotFoundError(f"{self.root} has no meta.jsonl: not a files-layout dataset")
        self.meta = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()]
        self.keys = [m["key"] for m in self.meta]
        classes = self.root / "classes.txt"
        self.classes = classes.read_text().split() if classes.is_file() else []
        palette = self.root / "palette.txt"
        self.palette = ([[int(v) for v in ln.split()] for ln in palette.read_text().splitlines() if ln.strip()]
                        if palette.is_file() else [])

    def __len__(self) -> int:
        return len(self.meta)

    def __getitem__(self, i: int) -> Sample:
        m = self.meta[i]
        arrays = read_sample(self.root, m["key"])
        return Sample(key=m["key"], caption=m.get("caption", ""), **arrays)

    def __iter__(self) -> Iterator[Sample]:
        return (self[i] for i in range(len(self)))
