"""Sheets to look at: a generated dataset's contact sheet (image | segmentation overlay | saliency | depth |
zero-shot segmentation overlay, one row per sample) and a captioned image grid (prompt fidelity)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..tasks import class_task
from ..tasks import get as get_task
from .dataset import GeneratedDataset
from .members import IGNORE_INDEX

# A perceptually ordered dark → bright ramp (magma-like anchors); near depths are drawn bright.
_RAMP = np.array([[0, 0, 4], [59, 15, 112], [140, 41, 129], [222, 73, 104], [254, 159, 109], [252, 253, 191]], float)


def colorize_depth(depth: np.ndarray) -> np.ndarray:
    """(H, W) depth → (H, W, 3) uint8, min–max normalised per image, near = bright, 0 (invalid) = black."""
    valid = depth > 0
    if not valid.any():
        return np.zeros((*depth.shape, 3), np.uint8)
    lo, hi = depth[valid].min(), depth[valid].max()
    x = 1.0 - (depth - lo) / max(hi - lo, 1e-6)  # 1 = nearest
    pos = np.clip(x, 0, 1) * (len(_RAMP) - 1)
    i = np.minimum(pos.astype(int), len(_RAMP) - 2)
    f = (pos - i)[..., None]
    rgb = _RAMP[i] * (1 - f) + _RAMP[i + 1] * f
    rgb[~valid] = 0
    return rgb.round().astype(np.uint8)


def overlay_seg(image: np.ndarray, seg: np.ndarray, palette: list[list[int]], alpha: float = 0.55) -> np.ndarray:
    """Blend class colours over the image; background (0) and ignore (255) stay as they are."""
    lut = np.zeros((256, 3), np.float32)
    for i, c in enumerate(palette[:255]):
        lut[i] = c
    for i in range(len(palette), 255):  # classes without a palette entry get a stable colour
        lut[i] = [(i * 67) % 256, (i * 151) % 256, (i * 211) % 256]
    colour = lut[seg]
    blend = np.where(((seg != 0) & (seg != IGNORE_INDEX))[..., None], alpha, 0.0)
    return (image * (1 - blend) + colour * blend).round().astype(np.uint8)


def contact_sheet(src: "Path | str", out: Path, n: int = 16, cell: int = 128, allow_partial: bool = False) -> int:
    """Write a PNG sheet of the first `n` samples of a `generate` folder; returns the rows drawn.
    An incomplete dataset is refused unless `allow_partial` (see GeneratedDataset)."""
    ds = GeneratedDataset(src, allow_partial=allow_partial)
    cols = ["image"] + list(ds.tasks)
    named = class_task(ds.tasks)
    rows = []
    for sample in ds:
        if len(rows) == n:
            break
        cells = [sample.image]
        for t in cols[1:]:
            lab = sample.labels[t]
            kind = get_task(t).kind
            if kind == "classes":  # openseg ids index its own class list: stable colours, no palette
                cells.append(overlay_seg(sample.image, lab, ds.palette if t == named else []))
            elif kind == "probability":
                cells.append(np.repeat(lab[..., None], 3, 2))
            else:
                cells.append(colorize_depth(lab))
        rows.append((sample.prompt, [Image.fromarray(c).resize((cell, cell), Image.NEAREST) for c in cells]))
    if not rows:
        raise ValueError(f"{src} has no finished samples yet")
    header, caption = 16, 14
    sheet = Image.new("RGB", (cell * len(cols), header + len(rows) * (cell + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, name in enumerate(cols):
        draw.text((j * cell + 4, 2), name, fill="black")
    for r, (prompt, cells) in enumerate(rows):
        y = header + r * (cell + caption)
        for j, im in enumerate(cells):
            sheet.paste(im, (j * cell, y))
        draw.text((4, y + cell + 1), prompt[: 6 * len(cols) * cell // 36], fill="black")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return len(rows)


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
