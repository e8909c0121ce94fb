"""A plain folder: images/ plus a folder of labels per task (seg/, saliency/, depth/, …) with the same file
names (stems)."""

from __future__ import annotations

from pathlib import Path

from ...tasks import TASKS
from ..readers import Sample
from ._read import LABEL_EXTS, READ_LABEL, Reader, need_dir, read_rgb

_IMAGE_EXTS = (".jpg", ".jpeg", ".png")


def _stems(folder: Path, exts: tuple[str, ...]) -> dict[str, Path]:
    """{stem: path} of the files with these extensions; two files with one stem are an error."""
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() in exts:
            if p.stem in out:
                raise ValueError(f"{folder}: {out[p.stem].name} and {p.name} share the key {p.stem}")
            out[p.stem] = p
    return out


def read_classes(path: Path) -> list[str]:
    """classes.txt → names: one a line (names may hold spaces), or all on one line split at whitespace."""
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    return lines[0].split() if len(lines) == 1 else lines


class FolderDataset(Reader):
    """Labelled images in a plain folder; every present label folder must hold a file for every image.

    Layout: `images/*.{jpg,jpeg,png}`; `seg/<stem>.png` (8-bit class ids, 255 = ignore);
    `saliency/<stem>.png` (8-bit 0–255); `depth/<stem>.png` (16-bit millimetres) or `.npy` (float metres),
    0 = invalid; any other trained task's folder (tasks.py), read as its kind says; optional `classes.txt` and `palette.txt` (one `r g b` a line). Keys are the image stems.
    A split is a sub-folder with that layout: `folder:<root>` with split `val` reads `<root>/val/`.

    Args:
        root: the folder.
        split: None, or the name of a sub-folder of `root` in this layout.
    """

    def __init__(self, root: Path, split: str | None = None):
        root = need_dir(Path(root), "images/ and label folders")
        self.root = need_dir(root / split, f"split {split!r} as a sub-folder with images/") if split else root
        self._images = _stems(need_dir(self.root / "images", "the image files"), _IMAGE_EXTS)
        if not self._images:
            raise FileNotFoundError(f"{self.root / 'images'} holds no .jpg or .png images")
        self.keys = list(self._images)
        self._labels: dict[str, dict[str, Path]] = {}  # task → {stem: file}
        for task in TASKS.values():
            folder, exts = self.root / task.folder, LABEL_EXTS[task.kind]
            if task.trained and folder.is_dir():
                found = _stems(folder, exts)
                missing = next((k for k in self.keys if k not in found), None)
                if missing is not None:
                    raise FileNotFoundError(f"{folder}: no {task.name} file for image {missing} "
                                            f"(expected {missing} with extension {' or '.join(exts)})")
                self._labels[task.name] = found
        classes, palette = self.root / "classes.txt", self.root / "palette.txt"
        self.classes = read_classes(classes) if classes.is_file() else []
        self.palette = ([[int(v) for v in ln.split()] for ln in palette.read_text().splitlines() if ln.strip()]
                        if palette.is_file() else [])

    def __getitem__(self, i: int) -> Sample:
        key = self.keys[i]
        return Sample(key=key, image=read_rgb(self._images[key]),
                      labels={t: READ_LABEL[TASKS[t].kind](found[key]) for t, found in self._labels.items()})
