"""NYU Depth v2: the 16-bit PNG file-list layout of BTS / AdaBins / Depth-Anything, and the labelled .mat."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from ..readers import Sample
from ._read import Reader, load_mat, need_dir, read_depth, read_rgb

FRAME = (480, 640)  # (H, W) of every NYU Depth v2 frame
EIGEN_CROP = (slice(45, 471), slice(41, 601))  # Eigen et al. 2014: the evaluation crop of the 480 × 640 frame
MAX_DEPTH = 10.0  # metres: NYU is scored within 10 m
# Where BTS unpacks NYU: training lists are relative to sync/, test lists to official_splits/test/.
_LIST_BASES = ("", "sync", "official_splits/test", "official_splits/train")


def eval_mask(depth: np.ndarray, key: str) -> np.ndarray:
    """(480, 640) metres → copy with 0 (invalid) outside the Eigen crop and beyond 10 m.

    Our depth metrics skip depth ≤ 0, so this is the standard NYU evaluation protocol. It is applied on
    the stored frame, before any resize.
    """
    if depth.shape != FRAME:
        raise ValueError(f"NYU frame {key} is {depth.shape[0]}×{depth.shape[1]}: the Eigen crop needs 480×640")
    out = np.zeros_like(depth)
    out[EIGEN_CROP] = depth[EIGEN_CROP]
    out[out > MAX_DEPTH] = 0
    return out


def _find_list(root: Path, name: str) -> Path:
    cands = [Path(name), root / name]
    if Path(name).name == name:  # a bare name: also one folder down (e.g. train_test_inputs/)
        cands += sorted(root.glob(f"*/{name}"))
    found = next((p for p in cands if p.is_file()), None)
    if found is None:
        raise FileNotFoundError(f"{name}: no such NYU file list in {root} or one folder down "
                                "(expected lines 'rgb_path depth_path [focal]')")
    return found


class NYUListDataset(Reader):
    """NYU Depth v2 as 16-bit PNGs named by a file list (BTS's `nyudepthv2_train_files_with_gt.txt`, …).

    List lines are `rgb_path depth_path [focal]`, relative to the data folder (a leading slash is
    ignored); the first line's image decides whether that folder is `root`, `root/sync` or
    `root/official_splits/{test,train}`. Depth PNGs hold millimetres (0 = invalid) and are read as
    float32 metres; lines whose depth is `None` are skipped with one warning counting them. Samples carry
    `depth` only; keys are the image path without extension, `/` → `_` (`kitchen_0028a_rgb_00045`).

    Evaluation convention: NYU is scored within 10 m on the Eigen crop (rows 45:471, cols 41:601 of the
    480 × 640 frame); with `eigen_crop`, depth outside it or beyond 10 m is set to 0 before any resize.

    Args:
        root: the NYU data folder (or the folder holding `sync/` and `official_splits/`).
        file_list: the list's path, or its name in `root` or one folder below it.
        eigen_crop: apply the evaluation mask; None: when the list's file name contains "test".
    """

    def __init__(self, root: Path, file_list: str | Path, *, eigen_crop: bool | None = None):
        root = need_dir(Path(root), "the NYU Depth v2 data folder")
        self.list_path = _find_list(root, str(file_list))
        rows, skipped = [], 0
        for n, line in enumerate(self.list_path.read_text().splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 2:
                raise ValueError(f"{self.list_path}:{n}: expected 'rgb_path depth_path [focal]'")
            if fields[1] == "None":
                skipped += 1
                continue
            rows.append((fields[0].lstrip("/"), fields[1].lstrip("/")))
        if skipped:
            warnings.warn(f"{self.list_path.name}: skipped {skipped} lines without depth", stacklevel=2)
        if not rows:
            raise ValueError(f"{self.list_path}: no line names an image with depth")
        self.base = next((root / b for b in _LIST_BASES if (root / b / rows[0][0]).is_file()), None)
        if self.base is None:
            raise FileNotFoundError(f"{root / rows[0][0]}: no such image (list paths are read relative to "
                                    f"{root}, its sync/ or official_splits/test|train/)")
        self._rows = rows
        self.keys = [Path(rgb).with_suffix("").as_posix().replace("/", "_") for rgb, _ in rows]
        self.eigen_crop = "test" in self.list_path.name.lower() if eigen_crop is None else eigen_crop
        self.classes, self.palette = [], []

    def __getitem__(self, i: int) -> Sample:
        rgb, depth_path = self._rows[i]
        depth = read_depth(self.base / depth_path)  # (H, W) metres
        if self.eigen_crop:
            depth = eval_mask(depth, self.keys[i])
        return Sample(key=self.keys[i], image=read_rgb(self.base / rgb), labels={"depth": depth})


def _h5py():
    try:
        import h5py
    except ImportError:
        raise ImportError("reading NYU's labelled .mat needs h5py: pip install h5py") from None
    return h5py


class NYULabeledDataset(Reader):
    """NYU Depth v2's 1,449 labelled frames from `nyu_depth_v2_labeled.mat` (MATLAB v7.3, i.e. HDF5).

    HDF5 holds MATLAB's column-major arrays transposed: `images` (N, 3, W, H) uint8 and `depths`
    (N, W, H) metres; a frame is read on access and turned back to (H, W, 3) and (H, W). Splits come from
    `splits.mat` beside it (`trainNdxs` / `testNdxs`, 1-based): `train` (795), `test` (654); `all` always
    works. Default: train when splits.mat exists, else all. Keys: the 1-based frame index, 5 digits.

    Evaluation convention: as NYUListDataset (Eigen crop, 10 m), on by default for `test`.

    Args:
        path: the labelled .mat file.
        split: train, test or all (None: the default above).
        eigen_crop: apply the evaluation mask; None: for the test split.
    """

    def __init__(self, path: Path, split: str | None = None, *, eigen_crop: bool | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such file (expected nyu_depth_v2_labeled.mat)")
        h5py = _h5py()
        try:
            with h5py.File(self.path, "r") as f:
                if "images" not in f or "depths" not in f:
                    raise ValueError(f"{self.path}: expected the HDF5 datasets 'images' and 'depths'")
                n = f["depths"].shape[0]
        except OSError:
            raise ValueError(f"{self.path}: not a MATLAB v7.3 (HDF5) file like nyu_depth_v2_labeled.mat") from None
        splits = self.path.parent / "splits.mat"
        self.split = split if split is not None else ("train" if splits.is_file() else "all")
        if self.split == "all":
            index = list(range(n))
        elif self.split in ("train", "test"):
            if not splits.is_file():
                raise FileNotFoundError(f"{splits}: no such file (needed for split {self.split}; split all "
                                        "reads every frame)")
            index = [int(k) - 1 for k in np.ravel(load_mat(splits)[f"{self.split}Ndxs"])]  # 1-based
            if not all(0 <= k < n for k in index):
                raise ValueError(f"{splits}: {self.split}Ndxs go beyond the {n} frames of {self.path.name}")
        else:
            raise ValueError(f"unknown NYU .mat split {self.split!r}: expected train, test or all")
        self._index = index
        self.keys = [f"{k + 1:05d}" for k in index]
        self.eigen_crop = self.split == "test" if eigen_crop is None else eigen_crop
        self.classes, self.palette = [], []

    def __getitem__(self, i: int) -> Sample:
        k = self._index[i]
        with _h5py().File(self.path, "r") as f:  # opened per frame: nothing unpicklable is kept open
            image = np.ascontiguousarray(f["images"][k].transpose(2, 1, 0))  # (3, W, H) → (H, W, 3)
            depth = np.ascontiguousarray(f["depths"][k].T, dtype=np.float32)  # (W, H) → (H, W) metres
        if self.eigen_crop:
            depth = eval_mask(depth, self.keys[i])
        return Sample(key=self.keys[i], image=image, labels={"depth": depth})
