"""What every reader shares: the reader interface and lossless reads of one image, label or id list."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from ..members import decode_depth
from ..readers import Sample


class Reader:
    """The interface `build_cache` reads: `keys`, `classes`, `palette`, len, indexing and iteration.

    Subclasses set `keys` (one per sample, in reading order), `classes` and `palette` (empty when the
    dataset has no segmentation) in their constructor and define `__getitem__(i) -> Sample`; files are
    read only there, so opening a dataset of 10,000 images costs a listing, not a decode.
    """

    keys: list[str]
    classes: list[str]
    palette: list[list[int]]

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self) -> Iterator[Sample]:
        return (self[i] for i in range(len(self)))


def need_dir(path: Path, what: str) -> Path:
    """`path` if it is a folder, else one-line FileNotFoundError saying what was expected there."""
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder (expected {what})")
    return path


def read_rgb(path: Path) -> np.ndarray:
    """Any image file → (H, W, 3) uint8 (greyscale and CMYK JPEGs exist in DUTS and VOC)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def read_index_png(path: Path) -> np.ndarray:
    """Class-index PNG → (H, W) uint8 of the stored indices.

    A palette ("P") PNG is read as its indices, never through its colours: VOC's index is the class id
    and 255 its boundary. RGB label images are refused rather than guessed.
    """
    with Image.open(path) as im:
        if im.mode not in ("P", "L"):
            raise ValueError(f"{path} is a {im.mode} image: expected a palette or 8-bit class-index PNG")
        return np.asarray(im).astype(np.uint8, copy=False)


def read_gray(path: Path) -> np.ndarray:
    """Saliency mask → (H, W) uint8; RGB or palette masks become luminance, values are kept as stored."""
    with Image.open(path) as im:
        return np.asarray(im if im.mode == "L" else im.convert("L"))


def read_depth(path: Path) -> np.ndarray:
    """Depth file → (H, W) float32 metres, 0 = invalid: 16-bit PNG in millimetres, or `.npy` metres."""
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False).astype(np.float32, copy=False)  # an .npy may hold a pickle
    data = path.read_bytes()
    with Image.open(path) as im:
        if im.mode not in ("I;16", "I;16B", "I;16L", "I"):
            raise ValueError(f"{path} is a {im.mode} image: expected a 16-bit depth PNG in millimetres")
    return decode_depth(data)


# A label file by its task's kind (tasks.py).
READ_LABEL = {"classes": read_index_png, "probability": read_gray, "positive": read_depth}
LABEL_EXTS = {"classes": (".png",), "probability": (".png",), "positive": (".png", ".npy")}


def read_id_list(path: Path) -> list[str]:
    """An id list, one sample a line → ids in file order.

    Lines are either bare ids (VOC's `ImageSets`) or DeepLab-style pairs
    `/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png`: the id is the first field's stem.
    """
    ids = []
    for line in path.read_text().splitlines():
        if line.strip():
            ids.append(Path(line.split()[0]).stem)
    return ids


def load_mat(path: Path) -> dict:
    """MATLAB v5 file (SBD labels, NYU's splits.mat) → {name: value}, structs as attribute objects."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise ImportError(f"reading {path.name} needs scipy: pip install scipy") from None
    return loadmat(path, squeeze_me=True, struct_as_record=False)
