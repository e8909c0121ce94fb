"""Sheets to look at: a generated dataset's contact sheet (image | segmentation overlay | saliency | depth |
zero-shot segmentation overlay, one row per sample, under them a class legend and a depth colour bar) and a
captioned image grid (prompt fidelity)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from ..tasks import class_task
from ..tasks import get as get_task
from .dataset import GeneratedDataset
from .members import IGNORE_INDEX

# A perceptually ordered dark → bright ramp (magma-like anchors); near depths are drawn bright.
_RAMP = np.array([[0, 0, 4], [59, 15, 112], [140, 41, 129], [222, 73, 104], [254, 159, 109], [252, 253, 191]], float)
ELLIPSIS = "…"


def colorize_depth(depth: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """(H, W) depth → (H, W, 3) uint8, near = bright, 0 (invalid) = black. Normalised to [lo, hi] when given (so
    several maps and a colour bar share one scale; values outside are clipped), else min–max per image."""
    valid = depth > 0
    if not valid.any():
        return np.zeros((*depth.shape, 3), np.uint8)
    if lo is None or hi is None:
        lo, hi = depth[valid].min(), depth[valid].max()
    x = 1.0 - (depth - lo) / max(hi - lo, 1e-6)  # 1 = nearest
    pos = np.clip(x, 0, 1) * (len(_RAMP) - 1)
    i = np.minimum(pos.astype(int), len(_RAMP) - 2)
    f = (pos - i)[..., None]
    rgb = _RAMP[i] * (1 - f) + _RAMP[i + 1] * f
    rgb[~valid] = 0
    return rgb.round().astype(np.uint8)


def depth_range(maps: list[np.ndarray]) -> tuple[float, float] | None:
    """(min, max) over the valid (> 0) pixels of several depth maps; None when none is valid."""
    valid = [m[m > 0] for m in maps]
    valid = [v for v in valid if v.size]
    if not valid:
        return None
    return float(min(v.min() for v in valid)), float(max(v.max() for v in valid))


def class_colours(palette: list[list[int]]) -> np.ndarray:
    """(256, 3) uint8 lookup table of class id → colour: the palette's entries, then a stable colour for each id
    without one (openseg's ids index its own class list, which has no palette)."""
    lut = np.zeros((256, 3), np.uint8)
    for i, c in enumerate(palette[:255]):
        lut[i] = c
    for i in range(len(palette), 255):
        lut[i] = [(i * 67) % 256, (i * 151) % 256, (i * 211) % 256]
    return lut


def coloured(seg: np.ndarray) -> np.ndarray:
    """(H, W) bool: the pixels an overlay colours (every class but background 0 and ignore)."""
    return (seg != 0) & (seg != IGNORE_INDEX)


def seg_layer(seg: np.ndarray, palette: list[list[int]], alpha: float = 0.55) -> np.ndarray:
    """(H, W) class ids → (H, W, 4) uint8 RGBA: class colours at `alpha` where `coloured`, transparent elsewhere
    (what `overlay_seg` blends, as a layer a viewer composites over the image itself)."""
    rgba = np.zeros((*seg.shape, 4), np.uint8)
    rgba[..., :3] = class_colours(palette)[seg]
    rgba[..., 3] = np.where(coloured(seg), round(alpha * 255), 0)
    return rgba


def overlay_seg(image: np.ndarray, seg: np.ndarray, palette: list[list[int]], alpha: float = 0.55) -> np.ndarray:
    """Blend class colours over the image; background (0) and ignore (255) stay as they are."""
    colour = class_colours(palette)[seg].astype(np.float32)
    blend = np.where(coloured(seg)[..., None], alpha, 0.0)
    return (image * (1 - blend) + colour * blend).round().astype(np.uint8)


def task_classes(info: dict, task: str) -> tuple[list[str], list[list[int]]]:
    """A "classes" task's class names and the palette its overlay uses: the dataset's classes and palette for the
    trained class task (seg); a zero-shot task's own class list (dataset.json's openseg.classes) and no palette."""
    if task == class_task(list(info.get("tasks", []))):
        return list(info.get("classes", [])), [list(c) for c in info.get("palette", [])]
    return list((info.get(task) or {}).get("classes", [])), []


def task_unit(info: dict, task: str) -> str:
    """A positive task's unit as dataset.json records it ("metre"; "relative": known up to scale)."""
    return (info.get(task) or {}).get("unit", "relative")


def unit_suffix(unit: str) -> str:
    """What follows a value of this unit: " m" for metres, "" for relative (unitless) values."""
    return {"metre": " m", "relative": ""}.get(unit, f" {unit}")


def ellipsize(draw: ImageDraw.ImageDraw, text: str, width: float) -> str:
    """`text` as drawn in at most `width` pixels: whole when it fits, else its longest prefix that fits with "…"."""
    if draw.textlength(text) <= width:
        return text
    lo, hi = 0, len(text)  # the longest prefix that fits lies in [lo, hi)
    while lo < hi - 1:
        mid = (lo + hi) // 2
        if draw.textlength(text[:mid].rstrip() + ELLIPSIS) <= width:
            lo = mid
        else:
            hi = mid
    return text[:lo].rstrip() + ELLIPSIS


_LINE = 14  # pixels per text line of the sheet (the default 10 px font)
_SWATCH = 10


def _place_legend(entries: list[tuple[str, tuple[int, int, int]]], width: int,
                  draw: ImageDraw.ImageDraw) -> tuple[list[tuple[int, int, str, tuple[int, int, int]]], int]:
    """Where each (name, colour) entry goes, wrapped to `width`: [(x, y, name, colour)] and the height used."""
    placed, x, y = [], 4, 0
    for name, colour in entries:
        name = ellipsize(draw, name, width - 8 - _SWATCH - 4)
        w = _SWATCH + 4 + int(draw.textlength(name)) + 10
        if x > 4 and x + w > width:
            x, y = 4, y + _LINE
        placed.append((x, y, name, colour))
        x += w
    return placed, (y + _LINE if entries else 0)


def _colour_bar(draw: ImageDraw.ImageDraw, sheet: Image.Image, y: int, width: int, title: str, lo: float, hi: float,
                unit: str) -> None:
    """A horizontal bar of `colorize_depth`'s ramp over [lo, hi] (near = left, bright), ticks at both ends and the
    middle labelled in the task's unit; takes 3 text lines from `y`."""
    draw.text((4, y), title, fill="black")
    bar_w = width - 8
    ramp = colorize_depth(np.linspace(lo, hi, bar_w, dtype=np.float64)[None].repeat(_SWATCH, 0), lo, hi)
    sheet.paste(Image.fromarray(ramp), (4, y + _LINE))
    for frac in (0.0, 0.5, 1.0):
        x = 4 + round(frac * (bar_w - 1))
        label = f"{lo + frac * (hi - lo):.2f}{unit}"
        draw.line([(x, y + _LINE + _SWATCH), (x, y + _LINE + _SWATCH + 2)], fill="black")
        tx = min(max(x - draw.textlength(label) / 2, 4), width - 4 - draw.textlength(label))
        draw.text((tx, y + _LINE + _SWATCH + 2), label, fill="black")


FRAMES_SHOWN = 5  # a clip's rows on the sheet: this many frames, evenly spaced from the first to the last


def contact_sheet(src: "Path | str", out: Path, n: int = 16, cell: int = 128, allow_partial: bool = False) -> int:
    """Write a PNG sheet of the first `n` samples of a `generate` folder; returns the samples drawn.

    Under the rows: a legend of the classes that appear in them (palette swatch and name, per class task) and,
    per positive-valued task (depth), a colour bar in its unit: the rows' depth maps share its [min, max].
    Captions too long for the row end in "…". An incomplete dataset is refused unless `allow_partial` (see
    GeneratedDataset). A dataset of clips: each clip takes FRAMES_SHOWN rows (frames evenly spaced, "frame i"
    before its caption), and `out` with the suffix .gif is the animation of every frame, the clips one under
    another, each frame's image beside its labels."""
    ds = GeneratedDataset(src, allow_partial=allow_partial)
    cols = ["image"] + list(ds.tasks)
    kinds = {t: get_task(t).kind for t in ds.tasks}
    samples = []
    for sample in ds:
        if len(samples) == n:
            break
        samples.append(sample)
    if not samples:
        raise ValueError(f"{src} has no finished samples yet")
    ranges = {t: depth_range([s.labels[t] for s in samples]) for t in ds.tasks if kinds[t] == "positive"}
    classes = {t: task_classes(ds.info, t) for t in ds.tasks if kinds[t] == "classes"}

    def cells(image: np.ndarray, labels: dict[str, np.ndarray]) -> list[Image.Image]:
        """One row: the image (H, W, 3) and each task's label map (H, W), drawn cell × cell."""
        out = [image]
        for t in cols[1:]:
            lab = labels[t]
            if kinds[t] == "classes":
                out.append(overlay_seg(image, lab, classes[t][1]))
            elif kinds[t] == "probability":
                out.append(np.repeat(lab[..., None], 3, 2))
            else:
                out.append(colorize_depth(lab, *(ranges[t] or (None, None))))
        return [Image.fromarray(c).resize((cell, cell), Image.NEAREST) for c in out]

    rows = []
    clip = samples[0].image.ndim == 4  # (F, H, W, 3)
    for sample in samples:
        if not clip:
            rows.append((sample.prompt, cells(sample.image, sample.labels)))
            continue
        frames = sample.image.shape[0]
        for i in sorted({int(round(x)) for x in np.linspace(0, frames - 1, min(frames, FRAMES_SHOWN))}):
            rows.append((f"frame {i}: {sample.prompt}", cells(sample.image[i], {t: v[i] for t, v in sample.labels.items()})))
    if clip:
        _animation(samples, cells, Path(out).with_suffix(".gif"), cell * len(cols), cell)

    width = cell * len(cols)
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))  # measures text before the sheet's height is known
    legend = []  # (name, colour) of every coloured class id that appears in the drawn rows, per class task
    for t, (names, palette) in classes.items():
        lut = class_colours(palette)
        present = np.unique(np.concatenate([np.unique(s.labels[t]) for s in samples]))
        for i in present[coloured(present)]:
            name = names[i] if i < len(names) else str(int(i))
            legend.append((name if len(classes) == 1 else f"{t}: {name}", tuple(int(v) for v in lut[i])))
    bars = [(t, r) for t, r in ranges.items() if r is not None]
    header, caption = 16, _LINE
    body = header + len(rows) * (cell + caption)
    placed, legend_h = _place_legend(legend, width, scratch)
    sheet = Image.new("RGB", (width, body + (legend_h + 4 if legend else 0) + 3 * _LINE * len(bars)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, name in enumerate(cols):
        draw.text((j * cell + 4, 2), ellipsize(draw, name, cell - 8), fill="black")
    for r, (prompt, cells) in enumerate(rows):
        y = header + r * (cell + caption)
        for j, im in enumerate(cells):
            sheet.paste(im, (j * cell, y))
        draw.text((4, y + cell + 1), ellipsize(draw, prompt, width - 8), fill="black")
    y = body
    if legend:
        y += 4
        for x, dy, name, colour in placed:
            draw.rectangle([x, y + dy + 1, x + _SWATCH - 1, y + dy + _SWATCH], fill=colour)
            draw.text((x + _SWATCH + 4, y + dy), name, fill="black")
        y += legend_h
    for t, (lo, hi) in bars:
        unit = unit_suffix(task_unit(ds.info, t))
        _colour_bar(draw, sheet, y, width, f"{t}" + (f" ({unit.strip()})" if unit else " (relative)"), lo, hi, unit)
        y += 3 * _LINE
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return len(samples)


def _animation(samples: list, cells: Callable, path: Path, width: int, cell: int) -> None:
    """An animated GIF (looping, at the clips' frame rate): frame i shows every clip's frame i beside its labels."""
    frames = min(s.image.shape[0] for s in samples)
    fps = samples[0].meta.get("fps", 16)
    pages = []
    for i in range(frames):
        page = Image.new("RGB", (width, cell * len(samples)), "white")
        for r, s in enumerate(samples):
            for j, im in enumerate(cells(s.image[i], {t: v[i] for t, v in s.labels.items()})):
                page.paste(im, (j * cell, r * cell))
        pages.append(page)
    path.parent.mkdir(parents=True, exist_ok=True)
    pages[0].save(path, save_all=True, append_images=pages[1:], duration=round(1000 / fps), loop=0)


def caption_grid(items: list[tuple[np.ndarray, str]], path: Path, cols: int = 8, side: int = 192) -> None:
    """A PNG grid of images (each (H, W, 3) uint8, drawn side × side), each with its caption wrapped underneath."""
    text_h = 44
    rows = (len(items) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * side, rows * (side + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (img, cap) in enumerate(items):
        x, y = (i % cols) * side, (i // cols) * (side + text_h)
        sheet.paste(Image.fromarray(img).resize((side, side), Image.NEAREST), (x, y))
        words, lines, line = cap.split(), [], ""
        for w in words:
            if len(line) + len(w) > 30:
                lines.append(line)
                line = ""
            line = f"{line} {w}".strip()
        lines.append(line)
        for j, ln in enumerate(lines[:4]):
            draw.text((x + 2, y + side + 1 + 10 * j), ln, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
