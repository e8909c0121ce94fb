"""Dataset readers: labelled images as plain numpy samples (image, and whichever labels exist)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .files import read_sample


@dataclass
class Sample:
    """One labelled image: image (H, W, 3) uint8; caption (may be empty); labels: task → (H, W) array as the
    task's kind says (tasks.py): seg uint8 ids (255 = ignore), saliency uint8 0–255, depth float32 metres
    (0 = invalid) — whichever the dataset has."""

    key: str
    image: np.ndarray
    caption: str = ""
    labels: dict[str, np.ndarray] = field(default_factory=dict)


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
        image = arrays.pop("image")
        return Sample(key=m["key"], image=image, caption=m.get("caption", ""), labels=arrays)

    def __iter__(self) -> Iterator[Sample]:
        return (self[i] for i in range(len(self)))
