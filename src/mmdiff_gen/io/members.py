"""Bytes of one sample's members, encoded losslessly by us (never by webdataset's lossy default encoders).

Member names follow WebDataset: KEY.jpg (or .png), KEY.txt, KEY.json, KEY.seg.png (8-bit class ids,
255 = ignore), KEY.sal.png (8-bit 0–255), KEY.depth.png (16-bit, value = depth × scale).
"""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

TASK_MEMBER = {"seg": "seg.png", "saliency": "sal.png", "depth": "depth.png", "openseg": "openseg.png"}
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
        labels: per task (TASK_MEMBER keys): seg / openseg (H, W) uint8 ids, saliency (H, W) uint8, depth
            (H, W) float in the dataset's unit.
        meta: the JSON member; the names of the seg classes present are added to it.
    """
    out = {image_format: encode_image(image, image_format), "txt": prompt.encode("utf-8")}
    meta = dict(meta)
    if "seg" in labels:
        ids = labels["seg"]
        meta["classes"] = [classes[i] if i < len(classes) else str(i) for i in np.unique(ids) if i != IGNORE_INDEX]
        out["seg.png"] = encode_gray(ids)
    if "saliency" in labels:
        out["sal.png"] = encode_gray(labels["saliency"])
    if "depth" in labels:
        out["depth.png"] = encode_depth(labels["depth"], DEPTH_SCALE)
    if "openseg" in labels:
        out["openseg.png"] = encode_gray(labels["openseg"])
    out["json"] = encode_json(meta)
    return out


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
