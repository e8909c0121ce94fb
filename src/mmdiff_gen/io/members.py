"""Bytes of one sample's members, encoded losslessly by us (never by webdataset's lossy default encoders).

Member names follow WebDataset: KEY.jpg (or .png), KEY.txt, KEY.json, and one KEY.<task member> per task
(tasks.py), encoded by the task's kind: classes as 8-bit ids (255 = ignore; KEY.seg.png), probabilities as
8-bit 0–255 (KEY.sal.png), positive values as 16-bit PNGs of value × scale (KEY.depth.png, millimetres).

A clip (a video backbone's sample) is KEY.mp4 (H.264 4:4:4, constant quality `VIDEO_CRF`, `VIDEO_FPS` frames per
second; what ffmpeg-based video loaders read — browsers play only 4:2:0) and one KEY.<task>.npz per task holding
every frame's labels losslessly as one (F, H, W) array "labels", the same values as the PNGs would hold (uint8 ids
or 0–255, uint16 value × scale); the JSON member says "frames" and "fps". Labels are exact per frame; the mp4's
pixels are the decoded frames after H.264's quantisation (BENCHMARKS.md measures what it costs against lossless
frames).
"""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from ..tasks import class_task
from ..tasks import get as get_task

IGNORE_INDEX = 255
VIDEO_FORMAT = "mp4"
VIDEO_FPS = 16  # Wan 2.1's frame rate
VIDEO_CRF = 17  # x264 constant quality: visually lossless
DEPTH_SCALE = 1000.0  # depth PNG value per unit: metres → millimetres, the NYU convention
# zlib level of 16-bit depth PNGs: level 6 (PIL's default) took 24–410 ms per noisy 1024² map, level 1 a
# fraction of that for slightly larger files (BENCHMARKS.md); still lossless.
DEPTH_PNG_LEVEL = 1


def encode_sample(image: np.ndarray, prompt: str, meta: dict, labels: dict[str, np.ndarray], *, image_format: str,
                  classes: list[str]) -> dict[str, bytes]:
    """Every member of one generated sample: the image, its prompt, its labels and its JSON metadata.

    Args:
        image: (H, W, 3) uint8; a clip's frames (F, H, W, 3) with image_format "mp4".
        labels: per registered task: (H, W) arrays as its kind says (class ids uint8, probabilities uint8 0–255,
            positive values float in the dataset's unit); a clip's (F, H, W).
        meta: the JSON member; the names of the classes present in the trained classes task (seg) are added.
    """
    clip = image_format == VIDEO_FORMAT
    pixels = encode_video(image) if clip else encode_image(image, image_format)
    out = {image_format: pixels, "txt": prompt.encode("utf-8")}
    meta = dict(meta) | ({"frames": int(image.shape[0]), "fps": VIDEO_FPS} if clip else {})
    named = class_task(list(labels))
    if named is not None:
        meta["classes"] = [classes[i] if i < len(classes) else str(i) for i in np.unique(labels[named])
                           if i != IGNORE_INDEX]
    for task, array in labels.items():
        out[label_member(task, clip)] = encode_label_stack(task, array) if clip else encode_label(task, array)
    out["json"] = encode_json(meta)
    return out


def label_member(task: str, clip: bool = False) -> str:
    """The member suffix of a task's labels: its PNG (KEY.seg.png), a clip's array of every frame (KEY.seg.npz)."""
    t = get_task(task)
    return t.video_member if clip else t.member


def encode_label_stack(task: str, array: np.ndarray, scale: float = DEPTH_SCALE) -> bytes:
    """(F, H, W) labels of a clip → npz bytes of "labels": the values its PNGs would hold (uint16 value × scale for
    positive values, else uint8), zlib-compressed."""
    stored = depth_to_uint16(array, scale) if get_task(task).kind == "positive" else np.asarray(array, np.uint8)
    buf = io.BytesIO()
    np.savez_compressed(buf, labels=stored)
    return buf.getvalue()


def decode_label_stack(task: str, data: bytes, scale: float = DEPTH_SCALE) -> np.ndarray:
    """`encode_label_stack`'s inverse: (F, H, W) uint8, or float32 in the dataset's unit for positive values."""
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        stored = z["labels"]
    return stored.astype(np.float32) / scale if get_task(task).kind == "positive" else stored


def encode_video(frames: np.ndarray, fps: int = VIDEO_FPS, crf: int = VIDEO_CRF) -> bytes:
    """(F, H, W, 3) uint8 → H.264 mp4 bytes at constant quality `crf`, full-resolution chroma (yuv444p): on toy clips
    4:2:0 lost the saturated colours' edges (30.3 dB PSNR at CRF 17, 30.6 at CRF 10; 4:4:4 38.8 dB at the same
    bytes, BENCHMARKS.md)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt, stream.options = "yuv444p", {"crf": str(crf)}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def decode_video(data: bytes) -> np.ndarray:
    """mp4 bytes → (F, H, W, 3) uint8 frames."""
    import av

    with av.open(io.BytesIO(data)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def encode_label(task: str, array: np.ndarray, scale: float = DEPTH_SCALE) -> bytes:
    """One label map as its task's kind is stored: 16-bit PNG of value × `scale` for positive values, else 8-bit."""
    return encode_depth(array, scale) if get_task(task).kind == "positive" else encode_gray(array)


def decode_label(task: str, data: bytes, scale: float = DEPTH_SCALE) -> np.ndarray:
    """`encode_label`'s inverse: (H, W) uint8, or float32 in the dataset's unit for positive values."""
    return decode_depth(data, scale) if get_task(task).kind == "positive" else decode_gray(data)


def label_info(task: str, unit: str = "", clip: bool = False) -> dict:
    """How a task's member is encoded, for dataset.json (`unit`: of positive values; "" = relative)."""
    kind = get_task(task).kind
    box = 'npz array "labels" (frames, H, W)' if clip else "PNG"
    if kind == "positive":
        return {"unit": unit or "relative", "scale": DEPTH_SCALE, "invalid": 0,
                "encoding": f"uint16 {box}, value = label × scale"}
    if kind == "probability":
        return {"encoding": f"uint8 {box}, 0–255"}
    return {"encoding": f"uint8 {box} of class ids, {IGNORE_INDEX} = ignore"}


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
