"""The renders layout: images/ plus a folder of label PNGs per task (seg/, saliency/, depth/, …) and
meta.jsonl, one key per sample — what `toy render` writes and `train` / `eval` read as a dataset.

Labels are encoded as their task's kind says (io.members.encode_label): seg 8-bit class ids (255 = ignore),
saliency 8-bit 0–255, depth 16-bit PNG in millimetres (NYU convention; 0 = invalid). Every file is written
then renamed, so a reader never sees half a file; a sample's meta.jsonl line is written last.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from ..tasks import TASKS
from ..tasks import get as get_task
from .members import decode_label, encode_image, encode_label
from .shards import write_bytes_atomic


class FilesWriter:
    """Writes samples into the renders layout under `root` (created)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        (self.root / "images").mkdir(parents=True, exist_ok=True)
        self._folders: set[str] = set()  # label folders made so far (one mkdir each, not one per sample)
        self._meta = open(self.root / "meta.jsonl", "a", encoding="utf-8")

    def write(self, key: str, *, image: np.ndarray, meta: dict, labels: dict[str, np.ndarray]) -> None:
        """One sample: image (H, W, 3) uint8; labels: task → (H, W) array as its kind says (depth in metres)."""
        write_bytes_atomic(self.root / "images" / f"{key}.png", encode_image(image, "png"))
        for task, array in labels.items():
            folder = self.root / get_task(task).folder
            if folder.name not in self._folders:
                folder.mkdir(exist_ok=True)
                self._folders.add(folder.name)
            write_bytes_atomic(folder / f"{key}.png", encode_label(task, array))
        self._meta.write(json.dumps({"key": key, **meta}) + "\n")  # last: the sample is complete
        self._meta.flush()

    def close(self) -> None:
        self._meta.close()


def read_sample(root: Path, key: str) -> dict[str, np.ndarray]:
    """Lossless read of one sample of the renders layout: "image" and each task's labels present."""
    root = Path(root)
    out = {"image": np.asarray(Image.open(root / "images" / f"{key}.png").convert("RGB"))}
    for task in TASKS.values():
        p = root / task.folder / f"{key}.png"
        if task.trained and p.is_file():
            out[task.name] = decode_label(task.name, p.read_bytes())
    return out
