"""Bytes of one sample's members, encoded losslessly by us (never by webdataset's lossy default encoders).

Member names follow WebDataset: KEY.jpg (or .png), KEY.txt, KEY.json, and one KEY.<task member> per task
(tasks.py), encoded by the task's kind: classes as 8-bit ids (255 = ignore; KEY.seg.png), probabilities as
8-bit 0–255 (KEY.sal.png), positive values as 16-bit PNGs of value × scale (KEY.depth.png, millimetres).
"""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from ..tasks import class_task
from ..tasks import get as get_task

IGNORE_INDEX = 255
DEPTH_SCALE = 1000.0  # depth PNG value per unit: metres → millimetres, the NYU convention
# zlib level of 16-bit depth PNGs: level 6 (PIL's default) took 24–410 ms per noisy 1024² map, level 1 a
# fraction of that for slightly larger files (BENCHMARKS.md); still lossless.
DEPTH_PNG_LEVEL = 1


def encode_sample(image: np.ndarray, prompt: str, meta: dict, labels: dict[str, np.ndarray], *, image_format: str,
                  classes: list[str]) -> dict[str, bytes]:
    """Every member of one generated sample: the image, its prompt, its labels and its JSON metadata.

    Args:
        image: (H, W, 3) uint8.
        labels: per registered task: (H, W) arrays as its kind says (class ids uint8, probabilities uint8 0–255,
            positive values float in the dataset's unit).
        meta: the JSON member; the names of the classes present in the trained classes task (seg) are added.
    """
    out = {image_format: encode_image(image, image_format), "txt": prompt.encode("utf-8")}
    meta = dict(meta)
    named = class_task(list(labels))
    if named is not None:
        meta["classes"] = [classes[i] if i < len(classes) else str(i) for i in np.unique(labels[named])
                           if i != IGNORE_INDEX]
    for task, array in labels.items():
        out[get_task(task).member] = encode_label(task, array)
    out["json"] = encode_json(meta)
    return out


def encode_label(task: str, array: np.ndarray, scale: float = DEPTH_SCALE) -> bytes:
    """One label map as its task's kind is stored: 16-bit PNG of value × `scale` for positive values, else 8-bit."""
    return encode_depth(array, scale) if get_task(task).kind == "positive" else encode_gray(array)


def decode_label(task: str, data: bytes, scale: float = DEPTH_SCALE) -> np.ndarray:
    """`encode_label`'s inverse: (H, W) uint8, or float32 in the dataset's unit for positive values."""
    return decode_depth(data, scale) if get_task(task).kind == "positive" else decode_gray(data)


def label_info(task: str, unit: str = "") -> dict:
    """How a task's member is encoded, for dataset.json (`unit`: of positive values; "" = relative)."""
    kind = get_task(task).kind
    if kind == "positive":
        return {"unit": unit or "relative", "scale": DEPTH_SCALE, "invalid": 0,
                "encoding": "uint16 PNG, value = label × scale"}
    if kind == "probability":
        return {"encoding": "uint8 PNG, 0–255"}
    return {"encoding": f"uint8 PNG of class ids, {IGNORE_INDEX} = ignore"}


def encode_image(image: np.ndarray, fmt: str, quality: int = 95) -> bytes:
    """(H, W, 3) uint8 → JPEG (quality 95, 4:4:4) or PNG bytes."""
    buf = io.BytesIO()
    if fmt == "jpg":
        Image.fromarray(image).save(buf, format="JPEG", quality=quality, subsampling=0)
    elif fmt == "png":
        Image.fromarray(image).save(buf, format="PNG")
    else:
        raise ValueError(f"image format must be jpg or png, got {fmt!r}")
    return buf.getvalue()


def encode_gray(array: np.ndarray) -> bytes:
    """(H, W) uint8 → single-channel 8-bit PNG."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def depth_to_uint16(depth: np.ndarray, scale: float = DEPTH_SCALE) -> np.ndarray:
    """(H, W) depth → round(depth × scale) as uint16, clipped to 0…65535 (0 = invalid)."""
    return np.clip(np.round(np.asarray(depth, dtype=np.float64) * scale), 0, 65535).astype(np.uint16)


def encode_depth(depth: np.ndarray, scale: float = DEPTH_SCALE) -> bytes:
    """(H, W) depth → 16-bit PNG bytes of depth_to_uint16."""
    png = depth_to_uint16(depth, scale)
    buf = io.BytesIO()
    Image.fromarray(png).save(buf, format="PNG", compress_level=DEPTH_PNG_LEVEL)
    return buf.getvalue()


def encode_json(obj: dict) -> bytes:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True).encode("utf-8")


def decode_image(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def decode_gray(data: bytes) -> np.ndarray:
    """8-bit PNG → (H, W) uint8 exactly as written (no palette or luminance conversion)."""
    return np.asarray(Image.open(io.BytesIO(data)))


def decode_depth(data: bytes, scale: float = DEPTH_SCALE) -> np.ndarray:
    """16-bit PNG → (H, W) float32 depth in the dataset's unit."""
    return np.asarray(Image.open(io.BytesIO(data))).astype(np.float32) / scale
