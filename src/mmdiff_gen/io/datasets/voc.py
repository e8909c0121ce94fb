"""PASCAL VOC 2012 semantic segmentation, with DeepLab's SBD-augmented training set (train_aug, 10,582 images)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..readers import Sample
from ._read import Reader, load_mat, need_dir, read_id_list, read_index_png, read_rgb

VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor"]
VOC_SPLITS = ("train", "val", "trainval", "train_aug")
# Ready-made train_aug lists, first found wins: DeepLab's own name, mmsegmentation's `aug.txt`, and
# DeepLab's list kept beside SegmentationClassAug/ (lines `/JPEGImages/x.jpg /SegmentationClassAug/x.png`).
_AUG_LISTS = ("ImageSets/Segmentation/train_aug.txt", "ImageSets/Segmentation/aug.txt", "train_aug.txt")


def voc_palette(n: int = len(VOC_CLASSES)) -> list[list[int]]:
    """VOC's colormap: bits 0, 1, 2 of the class id set the top bit of R, G, B; bits 3, 4, 5 the next; …"""
    palette = []
    for cls in range(n):
        rgb = [0, 0, 0]
        for step in range(8):  # colour bit 7 - step takes id bit 3·step + channel
            for ch in range(3):
                rgb[ch] |= ((cls >> (3 * step + ch)) & 1) << (7 - step)
        palette.append(rgb)
    return palette


def _voc_root(root: Path) -> Path:
    need_dir(root, "VOCdevkit/VOC2012 or a folder holding it")
    for cand in (root, root / "VOCdevkit" / "VOC2012", root / "VOC2012"):
        if (cand / "JPEGImages").is_dir():
            return cand
    raise FileNotFoundError(f"{root}: not PASCAL VOC 2012 (expected JPEGImages/ in it or in VOCdevkit/VOC2012/)")


def _sbd_root(path: Path) -> Path | None:
    """The folder of SBD's `cls/`, `img/`, `train.txt`, `val.txt`: given as benchmark_RELEASE/ or its dataset/."""
    for cand in (path / "dataset", path):
        if (cand / "cls").is_dir():
            return cand
    return None


def _names(folder: Path) -> set[str]:
    return set(os.listdir(folder)) if folder.is_dir() else set()


class VOCDataset(Reader):
    """PASCAL VOC 2012 in its release layout; samples carry `seg` (H, W) uint8 class ids, 255 = boundary.

    Splits: `train` (1,464), `val` (1,449), `trainval` from `ImageSets/Segmentation/`, and `train_aug`
    (10,582 in DeepLab's setup) from a ready list (`ImageSets/Segmentation/train_aug.txt` or `aug.txt`,
    or `train_aug.txt` beside SegmentationClassAug/), else computed as (SBD train ∪ SBD val ∪ VOC train)
    − VOC val, else as (SegmentationClassAug/ ∪ VOC train) − VOC val. Default: train_aug when augmented
    labels exist, else train.

    An id's label is the first of SegmentationClass/<id>.png (palette PNG: the index is the class),
    SegmentationClassAug/<id>.png (class-index PNG), SBD cls/<id>.mat (`GTcls.Segmentation`).

    Args:
        root: `VOCdevkit/VOC2012`, or a folder holding `VOCdevkit/VOC2012`.
        split: one of VOC_SPLITS, or None for the default above.
        sbd: SBD release folder (`benchmark_RELEASE` or its `dataset/`); None looks for `benchmark_RELEASE/`
            in `root` and beside `VOCdevkit/`.
    """

    def __init__(self, root: Path, split: str | None = None, *, sbd: Path | None = None):
        self.root = _voc_root(Path(root))
        if sbd is not None:
            self.sbd = _sbd_root(need_dir(Path(sbd), "the SBD release: benchmark_RELEASE/ or its dataset/"))
            if self.sbd is None:
                raise FileNotFoundError(f"{sbd}: not the SBD release (expected cls/ in it or in dataset/)")
        else:
            found = (_sbd_root(p / "benchmark_RELEASE") for p in (Path(root), self.root.parent.parent))
            self.sbd = next((p for p in found if p is not None), None)
        aug_lists = [self.root / p for p in _AUG_LISTS if (self.root / p).is_file()]
        self.aug_dir = self.root / "SegmentationClassAug"
        has_aug = bool(aug_lists) or self.sbd is not None or self.aug_dir.is_dir()
        self.split = split if split is not None else ("train_aug" if has_aug else "train")
        if self.split not in VOC_SPLITS:
            raise ValueError(f"unknown VOC split {self.split!r}: expected one of {', '.join(VOC_SPLITS)}")
        if self.split != "train_aug":
            ids = self._voc_list(self.split)
        elif aug_lists:
            ids = read_id_list(aug_lists[0])
        elif has_aug:
            ids = self._train_aug_ids()
        else:
            raise FileNotFoundError(f"{self.root}: no train_aug labels (expected ImageSets/Segmentation/"
                                    "train_aug.txt, SegmentationClassAug/ or SBD's benchmark_RELEASE/)")
        self.keys = ids
        self.classes, self.palette = list(VOC_CLASSES), voc_palette()
        self._labels = self._label_paths(ids)

    def _voc_list(self, split: str) -> list[str]:
        path = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such split list (expected one id a line)")
        return read_id_list(path)

    def _train_aug_ids(self) -> list[str]:
        ids = set(self._voc_list("train"))
        if self.sbd is not None:
            for name in ("train.txt", "val.txt"):
                if not (self.sbd / name).is_file():
                    raise FileNotFoundError(f"{self.sbd / name}: no such SBD list (expected one id a line)")
                ids |= set(read_id_list(self.sbd / name))
        else:  # DeepLab's SegmentationClassAug/ holds train_aug and val labels alike
            ids |= {Path(n).stem for n in _names(self.aug_dir) if n.endswith(".png")}
        return sorted(ids - set(self._voc_list("val")))

    def _label_paths(self, ids: list[str]) -> list[Path]:
        # One listing per folder instead of a stat per id and folder: train_aug is 10,582 ids.
        sources = [(self.root / "SegmentationClass", ".png"), (self.aug_dir, ".png")]
        if self.sbd is not None:
            sources.append((self.sbd / "cls", ".mat"))
        listed = [(folder, ext, _names(folder)) for folder, ext in sources]
        paths = []
        for i in ids:
            found = next((folder / f"{i}{ext}" for folder, ext, names in listed if f"{i}{ext}" in names), None)
            if found is None:
                raise FileNotFoundError(f"{i} (VOC {self.split}) has no label in "
                                        + ", ".join(str(folder) for folder, _ in sources))
            paths.append(found)
        return paths

    def __getitem__(self, i: int) -> Sample:
        key, label = self.keys[i], self._labels[i]
        image = self.root / "JPEGImages" / f"{key}.jpg"
        if not image.is_file() and self.sbd is not None:
            image = self.sbd / "img" / f"{key}.jpg"  # SBD ships its own copies of the VOC2011 images
        if label.suffix == ".mat":
            seg = np.asarray(load_mat(label)["GTcls"].Segmentation, dtype=np.uint8)  # (H, W) ids 0–20
        else:
            seg = read_index_png(label)
        return Sample(key=key, image=read_rgb(image), labels={"seg": seg})
