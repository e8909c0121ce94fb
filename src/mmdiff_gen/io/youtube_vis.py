"""YouTube-VIS export of a dataset of clips: frames, per-frame class-id PNGs and instance tracks.

Layout (the YouTube-VIS 2019/2021 one that VIS loaders read — detectron2's `ytvis` builders, mmdet's, VITA's):

    OUT/JPEGImages/KEY/00000.jpg …   every frame of clip KEY (decoded from its mp4)
    OUT/videos/KEY.mp4               the stored clip, as generated
    OUT/labels/KEY/00000.png …       class ids per frame (255 = ignore); other tasks under their folder, as PNGs
    OUT/instances.json               videos, categories, and one annotation per tracked instance

An instance is an 8-connected component of one class in a frame (as the COCO export splits classes), followed from
frame to frame: each component takes the instance of the same class whose mask in the previous frame overlaps it most
(IoU, one component per instance, best pairs first); a component matching none starts an instance. An instance whose
object vanishes (fully occluded) and comes back is a new instance: the labels carry no identity to re-identify it.
Each annotation holds, per frame, a compressed RLE, area and bbox, or None where the instance is absent.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import numpy as np

from .._atomic import atomic_folder
from ..tasks import class_task
from ..tasks import get as get_task
from .coco import components, rle_annotation
from .dataset import GeneratedDataset
from .members import IGNORE_INDEX, VIDEO_FORMAT, encode_gray, encode_image, encode_label


def track_instances(seg: np.ndarray, category_ids: set[int], min_area: int = 0) -> list[dict]:
    """Instances of a clip's class-id maps (F, H, W): [{"category_id", "masks": {frame: (H, W) bool}}], in the order
    they first appear; components under `min_area` pixels are left out."""
    tracks: list[dict] = []
    active: dict[int, np.ndarray] = {}  # track index → its mask in the previous frame
    for f, frame in enumerate(seg):
        comps = [(cid, mask) for cid, area, mask in components(frame, category_ids) if area >= min_area]
        pairs = []  # (IoU, component, track) of every same-class overlap with the previous frame
        for c, (cid, mask) in enumerate(comps):
            for t, prev in active.items():
                if tracks[t]["category_id"] == cid:
                    inter = np.logical_and(mask, prev).sum()
                    if inter:
                        pairs.append((inter / np.logical_or(mask, prev).sum(), c, t))
        taken, used, now = {}, set(), {}
        for _, c, t in sorted(pairs, reverse=True):
            if c not in taken and t not in used:
                taken[c], used = t, used | {t}
        for c, (cid, mask) in enumerate(comps):
            t = taken.get(c)
            if t is None:
                tracks.append({"category_id": cid, "masks": {}})
                t = len(tracks) - 1
            tracks[t]["masks"][f] = mask
            now[t] = mask
        active = now
    return tracks


def export_youtube_vis(src: "Path | str", out: Path, include_background: bool = False,
                       min_quality: float | None = None, min_area: int = 0, allow_partial: bool = False,
                       overwrite: bool = False) -> dict:
    """Write the YouTube-VIS layout above (arguments as `coco.export_coco`'s; the folder appears whole or not at all).

    Returns counts: videos, frames, annotations (tracked instances), categories."""
    if min_area < 0:
        raise ValueError(f"min_area must be ≥ 0 pixels, got {min_area}")
    ds = GeneratedDataset(src, min_quality=min_quality, allow_partial=allow_partial)
    if ds.info["image_format"] != VIDEO_FORMAT:
        raise ValueError(f"{src} holds images, not clips: export it with --format coco")
    named = class_task(ds.tasks)
    if named is None:
        raise ValueError(f"{src} has no segmentation: generate it with --tasks seg to export YouTube-VIS")
    with atomic_folder(Path(out), overwrite=overwrite) as tmp:
        return _write(ds, tmp, named, include_background, min_area)


def _write(ds: GeneratedDataset, out: Path, named: str, include_background: bool, min_area: int) -> dict:
    others = {t: get_task(t).folder for t in ds.tasks if t != named}
    first = 0 if include_background else 1
    categories = [{"id": i, "name": n, "supercategory": "thing"} for i, n in enumerate(ds.classes) if i >= first]
    known = {c["id"] for c in categories} - {IGNORE_INDEX}
    videos, annotations, frames = [], [], 0
    for video_id, sample in enumerate(ds, start=1):
        f, h, w = sample.image.shape[:3]
        names = [f"{sample.key}/{i:05d}.jpg" for i in range(f)]
        for folder in ("JPEGImages", "labels", *others.values()):
            (out / folder / sample.key).mkdir(parents=True, exist_ok=True)
        (out / "videos").mkdir(exist_ok=True)
        (out / "videos" / f"{sample.key}.mp4").write_bytes(sample.image_bytes)
        seg = sample.labels[named]  # (F, H, W)
        for i in range(f):
            (out / "JPEGImages" / names[i]).write_bytes(encode_image(sample.image[i], "jpg"))
            (out / "labels" / sample.key / f"{i:05d}.png").write_bytes(encode_gray(seg[i]))
            for task, folder in others.items():
                (out / folder / sample.key / f"{i:05d}.png").write_bytes(
                    encode_label(task, sample.labels[task][i], ds.scale(task)))
        videos.append({"id": video_id, "width": w, "height": h, "length": f, "file_names": names,
                       "caption": sample.prompt, "seed": sample.meta.get("seed")})
        frames += f
        for track in track_instances(seg, known, min_area):
            per_frame = [rle_annotation(track["masks"][i], 0, video_id, track["category_id"]) if i in track["masks"]
                         else None for i in range(f)]
            annotations.append({
                "id": len(annotations) + 1, "video_id": video_id, "category_id": track["category_id"], "iscrowd": 0,
                "height": h, "width": w, "length": 1,
                "segmentations": [a and a["segmentation"] for a in per_frame],
                "areas": [a and a["area"] for a in per_frame], "bboxes": [a and a["bbox"] for a in per_frame]})
    doc = {
        "info": {"description": f"mmdiff-gen synthetic clips from {ds.root.rstrip('/').rsplit('/', 1)[-1]}",
                 "version": str(ds.info.get("format_version")), "date_created": datetime.date.today().isoformat(),
                 "mmdiff_gen": {"fingerprint": ds.info["fingerprint"], "backbone": ds.info["backbone"].get("name"),
                                **{t: ds.info.get(t) for t in others}, "ignore_index": ds.info.get("ignore_index"),
                                "instances": "8-connected components of a class, tracked by same-class overlap",
                                "min_area": min_area}},
        "licenses": [], "videos": videos, "annotations": annotations, "categories": categories,
    }
    (out / "instances.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False), encoding="utf-8")
    return {"videos": len(videos), "frames": frames, "annotations": len(annotations), "categories": len(categories)}
