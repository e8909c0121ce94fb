"""COCO export of a generated dataset: images, instance annotations (compressed RLE or polygons), plus the
class-id PNGs (labels/) and a folder per other task (saliency/, depth/, …) beside them.

One annotation per connected component of each class in each image, `iscrowd: 0`, each with its own
RLE, area and bbox: COCO's iscrowd-0 annotations are single objects, which detection and
instance-segmentation frameworks (detectron2, mmdet, torchvision) count and box one by one, so a class
region is split into its components rather than annotated whole. The split can only follow the label
map: two same-class objects that touch (share an edge or, under 8-connectivity, a corner) stay one
annotation. There is no semantic mode (one annotation per class per image): semantic-segmentation users
read the class-id PNGs in labels/, which hold every pixel whatever `min_area` drops.

Masks as compressed RLE (the default) are exact, holes included; pycocotools, mmdet, torchvision's
`wrap_dataset_for_transforms_v2` and detectron2 with `INPUT.MASK_FORMAT=bitmask` read them. Code that reads only
polygons (detectron2's default, torchvision's detection references, DETR-style loaders calling
`frPyObjects` on every segmentation) needs `mask_format="polygon"`: a component's outline along its pixel edges,
which pycocotools rasterizes back to exactly its pixels, holes filled (COCO polygons are unions: a hole's
outline would be drawn filled).
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Iterator

import numpy as np
from pycocotools import mask as mask_utils
from scipy import ndimage

from .dataset import GeneratedDataset
from ..tasks import class_task
from ..tasks import get as get_task
from .members import IGNORE_INDEX, VIDEO_FORMAT, encode_gray, encode_label
from .._atomic import atomic_folder


# 8-connectivity (pixels touching at a corner belong together), the default of OpenCV's
# connectedComponents and skimage.measure.label: a thin diagonal part of one object (a limb, an
# anti-aliased edge, a star's tip) stays with it instead of breaking off as a spurious instance.
# The price: two same-class objects meeting only at a corner merge (sharing an edge, they merge under
# either choice).
CONNECTIVITY = np.ones((3, 3), dtype=bool)

MASK_FORMATS = ("rle", "polygon")


def rle_annotation(mask: np.ndarray, ann_id: int, image_id: int, category_id: int) -> dict:
    """A COCO annotation of one binary (H, W) mask as compressed RLE (counts as str, JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "segmentation": rle,
            "area": float(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0}


def polygon_annotation(mask: np.ndarray, ann_id: int, image_id: int, category_id: int) -> dict:
    """A COCO annotation of one 8-connected (H, W) component as polygons [[x0, y0, x1, y1, …]] along its pixel
    edges (COCO's x, y: pixel (r, c) spans [c, c + 1) × [r, r + 1)), holes filled; area and bbox of the filled
    mask, which is what the polygons rasterize to."""
    from skimage.measure import approximate_polygon, find_contours

    filled = ndimage.binary_fill_holes(mask, structure=CONNECTIVITY)  # a hole: background 8-connected, as below
    # The 0.5 level of the zero-padded mask runs midway between inside and outside pixel centres: along the
    # pixel edges, cutting each corner pixel's outer eighth, which rasterization gives back. With the background
    # 8-connected (find_contours' default), a component touching diagonally gives one outline per 4-connected
    # part; tolerance 0 only drops collinear points.
    outlines = find_contours(np.pad(filled, 1).astype(np.float32), 0.5)
    polygons = [(approximate_polygon(c, 0)[:, ::-1] - 0.5).round(2).ravel().tolist() for c in outlines]
    ann = rle_annotation(filled, ann_id, image_id, category_id)
    return ann | {"segmentation": [p for p in polygons if len(p) >= 6]}


_ANNOTATION = {"rle": rle_annotation, "polygon": polygon_annotation}


def components(seg: np.ndarray, category_ids: set[int]) -> Iterator[tuple[int, int, np.ndarray]]:
    """The instances of a class-id map: (category id, area in pixels, binary (H, W) mask) per 8-connected
    component of each class in `category_ids` (other ids, e.g. background and ignore, are skipped), by
    class id, then in raster order of each component's first pixel."""
    for cid in np.unique(seg):
        if int(cid) not in category_ids:
            continue
        comp, n = ndimage.label(seg == cid, structure=CONNECTIVITY)  # (H, W) component ids, 0 = elsewhere
        areas = np.bincount(comp.ravel(), minlength=n + 1)
        for k in range(1, n + 1):
            yield int(cid), int(areas[k]), comp == k


def export_coco(src: "Path | str", out: Path, include_background: bool = False, min_quality: float | None = None,
                min_area: int = 0, allow_partial: bool = False, mask_format: str = "rle", overwrite: bool = False) -> dict:
    """Write OUT/images/, OUT/annotations.json, OUT/labels/ and a folder per other task the dataset has (saliency/,
    depth/, openseg/: each task's folder name, encoded as in the dataset).

    Args:
        src: a `generate` output folder or URL.
        out: export folder: filled beside it and renamed into place whole (_atomic.atomic_folder), so a failed
            export leaves nothing and two exports never mix; one that holds anything is refused unless `overwrite`.
        include_background: also annotate class 0 (off by default: COCO categories are things).
        min_quality: export only samples whose quality score is at least this.
        min_area: leave out of annotations.json the components of fewer pixels than this (specks a
            detector should not learn as objects); 0 keeps every component. labels/ is not touched.
        allow_partial: export the whole shards of an incomplete dataset instead of refusing it.
        mask_format: "rle" (exact) or "polygon" (for polygon-only readers; holes filled: module docstring).
        overwrite: replace an export folder that holds anything.
    Returns:
        counts: images, annotations, categories, and dropped (components under `min_area`).
    """
    if min_area < 0:
        raise ValueError(f"min_area must be ≥ 0 pixels, got {min_area}")
    if mask_format not in MASK_FORMATS:
        raise ValueError(f"mask format must be one of {', '.join(MASK_FORMATS)}, got {mask_format!r}")
    ds = GeneratedDataset(src, min_quality=min_quality, allow_partial=allow_partial)
    if ds.info["image_format"] == VIDEO_FORMAT:
        raise ValueError(f"{src} holds clips: export it with --format youtube-vis")
    named = class_task(ds.tasks)  # the task whose ids are COCO's categories
    if named is None:
        raise ValueError(f"{src} has no segmentation: generate it with --tasks seg to export COCO")
    with atomic_folder(Path(out), overwrite=overwrite) as tmp:
        return _write_export(ds, tmp, named, include_background, min_area, mask_format)


def _write_export(ds: GeneratedDataset, out: Path, named: str, include_background: bool, min_area: int,
                  mask_format: str) -> dict:
    """Fill an empty (temporary) export folder; the counts `export_coco` returns."""
    annotate = _ANNOTATION[mask_format]
    others = {t: get_task(t).folder for t in ds.tasks if t != named}
    for name in ["images", "labels", *others.values()]:
        (out / name).mkdir(parents=True, exist_ok=True)
    first = 0 if include_background else 1
    categories = [{"id": i, "name": n, "supercategory": "thing"} for i, n in enumerate(ds.classes) if i >= first]
    known = {c["id"] for c in categories}
    images, annotations, dropped = [], [], 0
    ext = ds.info["image_format"]
    for image_id, sample in enumerate(ds, start=1):
        h, w = sample.image.shape[:2]
        name = f"{sample.key}.{ext}"
        (out / "images" / name).write_bytes(sample.image_bytes)  # the stored bytes: no second JPEG pass
        images.append({"id": image_id, "file_name": name, "height": h, "width": w, "caption": sample.prompt,
                       "seed": sample.meta.get("seed")})
        seg = sample.labels[named]
        (out / "labels" / f"{sample.key}.png").write_bytes(encode_gray(seg))
        for cid, area, mask in components(seg, known - {IGNORE_INDEX}):
            if area < min_area:
                dropped += 1  # from annotations.json only: labels/ keeps every pixel
            else:
                annotations.append(annotate(mask, len(annotations) + 1, image_id, cid))
        for task, folder in others.items():
            (out / folder / f"{sample.key}.png").write_bytes(encode_label(task, sample.labels[task], ds.scale(task)))
    coco = {
        "info": {"description": f"mmdiff-gen synthetic dataset from {ds.root.rstrip('/').rsplit('/', 1)[-1]}",
                 "version": str(ds.info.get("format_version")), "date_created": datetime.date.today().isoformat(),
                 "mmdiff_gen": {"fingerprint": ds.info["fingerprint"], "backbone": ds.info["backbone"].get("name"),
                                **{t: ds.info.get(t) for t in others}, "ignore_index": ds.info.get("ignore_index"),
                                "annotations": "one per 8-connected component of a class", "min_area": min_area,
                                "mask_format": mask_format + (" (holes filled)" if mask_format == "polygon" else "")}},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    (out / "annotations.json").write_text(json.dumps(coco, indent=1, ensure_ascii=False), encoding="utf-8")
    return {"images": len(images), "annotations": len(annotations), "categories": len(categories), "dropped": dropped}
