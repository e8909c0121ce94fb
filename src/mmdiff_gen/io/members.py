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
    Image.fromarray(png).save(buf, format="PNG")
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
