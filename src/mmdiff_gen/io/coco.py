"""COCO export of a generated dataset: images, semantic-segmentation annotations as compressed RLE,
plus label PNG, saliency and depth folders beside them.

One annotation per (image, category present), the COCO convention for semantic segmentation
(detectron2 reads it with MASK_FORMAT=bitmask); pycocotools' annToMask gives back the masks exactly.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from .dataset import GeneratedDataset
from .members import IGNORE_INDEX, encode_depth, encode_gray
from .shards import write_bytes_atomic, write_json_atomic


def rle_annotation(mask: np.ndarray, ann_id: int, image_id: int, category_id: int) -> dict:
    """A COCO annotation of one binary (H, W) mask as compressed RLE (counts as str, JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "segmentation": rle,
            "area": float(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0}


def export_coco(src: Path, out: Path, include_background: bool = False, min_quality: float | None = None) -> dict:
    """Write OUT/images/, OUT/annotations.json and OUT/labels/, saliency/, depth/ (whichever the dataset has).

    Args:
        src: a `generate` output folder.
        out: export folder (created; an existing annotations.json is replaced atomically).
        include_background: also annotate class 0 (off by default: COCO categories are things).
        min_quality: export only samples whose quality score is at least this.
    Returns:
        counts: images, annotations, categories.
    """
    ds = GeneratedDataset(src, min_quality=min_quality)
    if "seg" not in ds.tasks:
        raise ValueError(f"{src} has no segmentation: generate it with --tasks seg to export COCO")
    out = Path(out)
    folders = {"images": True, "labels": True, "saliency": "saliency" in ds.tasks, "depth": "depth" in ds.tasks}
    for name, wanted in folders.items():
        if wanted:
            (out / name).mkdir(parents=True, exist_ok=True)
    first = 0 if include_background else 1
    categories = [{"id": i, "name": n, "supercategory": "thing"} for i, n in enumerate(ds.classes) if i >= first]
    known = {c["id"] for c in categories}
    images, annotations = [], []
    ext = ds.info["image_format"]
    for image_id, sample in enumerate(ds, start=1):
        h, w = sample.image.shape[:2]
        name = f"{sample.key}.{ext}"
        write_bytes_atomic(out / "images" / name, sample.image_bytes)  # the stored bytes: no second JPEG pass
        images.append({"id": image_id, "file_name": name, "height": h, "width": w, "caption": sample.prompt,
                       "seed": sample.meta.get("seed")})
        seg = sample.labels["seg"]
        write_bytes_atomic(out / "labels" / f"{sample.key}.png", encode_gray(seg))
        for cid in np.unique(seg):
            if int(cid) in known and cid != IGNORE_INDEX:
                annotations.append(rle_annotation(seg == cid, len(annotations) + 1, image_id, int(cid)))
        if folders["saliency"]:
            write_bytes_atomic(out / "saliency" / f"{sample.key}.png", encode_gray(sample.labels["saliency"]))
        if folders["depth"]:
            write_bytes_atomic(out / "depth" / f"{sample.key}.png", encode_depth(sample.labels["depth"], ds.depth_scale))
    coco = {
        "info": {"description": f"mmdiff-gen synthetic dataset from {Path(src).resolve().name}",
                 "version": str(ds.info.get("format_version")), "date_created": datetime.date.today().isoformat(),
                 "mmdiff_gen": {"fingerprint": ds.info["fingerprint"], "backbone": ds.info["backbone"].get("name"),
                                "depth": ds.info.get("depth"), "ignore_index": ds.info.get("ignore_index")}},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    write_json_atomic(out / "annotations.json", coco)
    return {"images": len(images), "annotations": len(annotations), "categories": len(categories)}
