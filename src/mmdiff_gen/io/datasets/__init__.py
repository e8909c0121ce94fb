"""Readers of public labelled datasets in their release layouts, and `open_dataset`, the one way in.

Every reader has FilesDataset's interface (`keys`, `classes`, `palette`, len, indexing → Sample) and
reads files only when a sample is asked for.
"""

from __future__ import annotations

import re
from pathlib import Path

from ...errors import SettingsError
from ..readers import FilesDataset
from ._prepare import Prepared, fit_square, read_captions
from .duts import DUTSDataset
from .folder import FolderDataset
from .nyu import EIGEN_CROP, MAX_DEPTH, NYULabeledDataset, NYUListDataset, eval_mask
from .voc import VOC_CLASSES, VOC_SPLITS, VOCDataset, voc_palette

__all__ = [
    "EIGEN_CROP",
    "KINDS",
    "MAX_DEPTH",
    "VOC_CLASSES",
    "VOC_SPLITS",
    "DUTSDataset",
    "FolderDataset",
    "NYULabeledDataset",
    "NYUListDataset",
    "Prepared",
    "VOCDataset",
    "eval_mask",
    "fit_square",
    "open_dataset",
    "read_captions",
    "voc_palette",
]


def _files(path: Path, split: str | None):
    if split is not None:
        raise ValueError(f"the files layout has no splits (got split {split!r}): point at the split's folder")
    return FilesDataset(path)


def _nyu(path: Path, split: str | None):
    if path.suffix == ".mat":
        return NYULabeledDataset(path, split)
    if split is None:
        raise ValueError(f"{path}: NYU's PNG layout needs split=<file list>, e.g. nyudepthv2_train_files_with_gt.txt")
    return NYUListDataset(path, split)


# kind → opener(path, split); `kind:path` names a layout on the command line.
KINDS = {"voc": VOCDataset, "duts": DUTSDataset, "nyu": _nyu, "folder": FolderDataset, "files": _files}


def open_dataset(source: str | Path, *, split: str | None = None, size: int | None = None,
                 captions: Path | None = None):
    """Open labelled images named by `source` → a reader (keys, classes, palette, len, indexing → Sample).

    Args:
        source: `kind:path`, kind one of voc, duts, nyu, folder, files (`voc:data/VOCdevkit/VOC2012`,
            `duts:data/DUTS`, `nyu:data/nyu` with split = a file list, `nyu:data/nyu_depth_v2_labeled.mat`,
            `folder:data/mine`); a bare path is the files layout (a folder with meta.jsonl).
        split: the dataset's split (see each reader; None: its default).
        size: resize every sample so its shorter side is `size`, then center-crop to size × size
            (needed by the feature cache when image sizes differ); None: as stored.
        captions: JSONL of {"key", "caption"} lines; samples without a line keep their own caption ("").
    """
    text = str(source)
    match = re.fullmatch(r"([A-Za-z]+):(.+)", text)
    if match and match.group(1).lower() in KINDS:
        kind, path = match.group(1).lower(), Path(match.group(2))
    elif match and not Path(text).exists():
        raise SettingsError(f"unknown dataset kind {match.group(1)!r} in {text!r}: expected one of "
                         + ", ".join(KINDS))
    elif (Path(text) / "meta.jsonl").is_file():
        kind, path = "files", Path(text)
    else:
        raise ValueError(f"{text}: not a files-layout dataset (no meta.jsonl); name the layout as KIND:PATH "
                         f"with KIND one of {', '.join(KINDS)}")
    dataset = KINDS[kind](path, split)
    if size is None and captions is None:
        return dataset
    return Prepared(dataset, size=size, captions=read_captions(captions) if captions is not None else None)
