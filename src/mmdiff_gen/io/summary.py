"""What a generated dataset holds, as plain data: samples and shards (whole or not), classes with pixel, image and
instance counts, the quality score distribution, the backbone, heads and settings that made it, bytes on disk.

Counts come from one pass over every whole shard (GeneratedDataset with allow_partial: an incomplete dataset is
summarised, and says what it misses); scores, filtered and failed samples from the shards' done markers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ..tasks import get as get_task
from .coco import components
from .dataset import GeneratedDataset, GeneratedSample
from .members import IGNORE_INDEX
from .preview import class_colours, task_classes, task_unit
from .shards import shard_name
from .store import Store

QUALITY_BINS = 20


def spread(total: int, n: int) -> list[int]:
    """`n` indices evenly spread over range(total), first and last included (all of them when n ≥ total)."""
    if n >= total:
        return list(range(total))
    if n == 1:
        return [0]
    return [round(i * (total - 1) / (n - 1)) for i in range(n)]


class _ClassTally:
    """Per class id of one "classes" task: pixels, images in which it appears, instances (8-connected components,
    counted as io/coco.py splits them); ignore pixels apart."""

    def __init__(self):
        self.pixels = np.zeros(256, np.int64)
        self.images = np.zeros(256, np.int64)
        self.instances = np.zeros(256, np.int64)

    def add(self, seg: np.ndarray) -> None:
        counts = np.bincount(seg.ravel(), minlength=256)  # (256,) pixels per id
        self.pixels += counts
        self.images += counts > 0
        # Background is not an object (COCO's default export leaves it out): its components are not counted.
        for cid, _, _ in components(seg, set(range(1, 256)) - {IGNORE_INDEX}):
            self.instances[cid] += 1

    def table(self, names: list[str], palette: list[list[int]]) -> list[dict]:
        """One row per named class and per unnamed id that occurs; ignore left out (see `ignore_pixels`)."""
        lut = class_colours(palette)
        ids = sorted(set(range(len(names))) | ({int(i) for i in np.flatnonzero(self.pixels)} - {IGNORE_INDEX}))
        total = int(self.pixels.sum() - self.pixels[IGNORE_INDEX])
        return [{"id": i, "name": names[i] if i < len(names) else str(i), "colour": [int(v) for v in lut[i]],
                 "pixels": int(self.pixels[i]), "share": float(self.pixels[i] / total) if total else 0.0,
                 "images": int(self.images[i]), "instances": int(self.instances[i]) if i else None} for i in ids]


class _ValueTally:
    """Valid (> 0) values of one positive task (depth): count, min, max and sum for the mean."""

    def __init__(self):
        self.count, self.total, self.lo, self.hi = 0, 0.0, float("inf"), float("-inf")

    def add(self, values: np.ndarray) -> None:
        v = values[values > 0]
        if v.size:
            self.count += int(v.size)
            self.total += float(v.sum(dtype=np.float64))
            self.lo, self.hi = min(self.lo, float(v.min())), max(self.hi, float(v.max()))

    def result(self, unit: str) -> dict:
        if not self.count:
            return {"unit": unit, "valid_pixels": 0, "min": None, "max": None, "mean": None}
        return {"unit": unit, "valid_pixels": self.count, "min": self.lo, "max": self.hi,
                "mean": self.total / self.count}


def quality_summary(records: list[dict], min_quality: float | None) -> dict:
    """The score distribution of the shard-stats records that carry one (written and filtered samples), the
    filtered and failed counts, and a histogram of QUALITY_BINS bins spanning the scores and the threshold."""
    scores = np.array([r["quality"] for r in records if r.get("quality") is not None], np.float64)
    out = {"scored": int(scores.size), "unscored": sum(r.get("quality") is None for r in records),
           "filtered": sum(r["status"] == "filtered" for r in records),
           "failed": sum(r["status"] == "error" for r in records), "min_quality": min_quality,
           "min": None, "q1": None, "median": None, "q3": None, "max": None, "histogram": None}
    if not scores.size:
        return out
    q = np.percentile(scores, [0, 25, 50, 75, 100])
    out.update(zip(("min", "q1", "median", "q3", "max"), (float(v) for v in q)))
    lo, hi = float(q[0]), float(q[4])
    if min_quality is not None:
        lo, hi = min(lo, min_quality), max(hi, min_quality)
    if hi - lo < 1e-6:  # one value: a bin around it
        lo, hi = lo - 0.005, hi + 0.005
    counts, edges = np.histogram(scores, bins=QUALITY_BINS, range=(lo, hi))
    out["histogram"] = {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}
    return out


def summarize(root: "Path | str | Store | GeneratedDataset",
              visit: Callable[[int, GeneratedSample], None] | None = None) -> dict:
    """A summary of a generated dataset (a folder, a URL or an open GeneratedDataset), JSON-ready.

    Args:
        root: the dataset; opened with allow_partial (whole shards are counted, the rest is reported).
        visit: called with (index, sample) for every written sample of the pass, in key order: a caller that
            needs some samples too (the report's thumbnails) takes them without a second pass.
    Returns:
        location, format, whole, problems (one line, "" when whole), shards {planned, whole, unfinished,
        damaged {name: why}, stray}, samples {planned, attempted, written, filtered, failed, missing},
        tasks, classes {task: [{id, name, colour, pixels, share, images, instances}]}, ignore_pixels {task: n},
        values {task: {unit, valid_pixels, min, max, mean}}, quality (quality_summary), rejected [{key,
        prompt_index, prompt, status, error, quality}], backbone, heads, image {height, width, format},
        sampling, bytes (the whole shards' files, as their done markers record them).
    """
    ds = root if isinstance(root, GeneratedDataset) else GeneratedDataset(root, allow_partial=True)
    info, check = ds.info, ds.check
    kinds = {t: get_task(t).kind for t in ds.tasks}
    classes = {t: _ClassTally() for t in ds.tasks if kinds[t] == "classes"}
    values = {t: _ValueTally() for t in ds.tasks if kinds[t] == "positive"}
    prompts: dict[int, str] = {}  # prompt index → text, from the written samples (the stats records hold no text)
    for i, sample in enumerate(ds):
        for t, tally in classes.items():
            tally.add(sample.labels[t])
        for t, tally in values.items():
            tally.add(sample.labels[t])
        if "prompt_index" in sample.meta:
            prompts.setdefault(int(sample.meta["prompt_index"]), sample.prompt)
        if visit is not None:
            visit(i, sample)

    records = [r for s in sorted(check.finished) for r in check.finished[s]["samples"]]
    min_quality = (info.get("quality") or {}).get("min_quality")
    rejected = [{"key": r["key"], "prompt_index": r.get("prompt_index"), "prompt": prompts.get(r.get("prompt_index")),
                 "status": r["status"], "error": r.get("error"), "quality": r.get("quality")}
                for r in records if r["status"] != "ok"]
    attempted = sum(st.get("attempted", len(st["samples"])) for st in check.finished.values())
    sampling = dict(info.get("sampling") or {})
    return {
        "location": ds.root,
        "format": info.get("format"),
        "whole": check.whole,
        "problems": check.problems(),
        "shards": {"planned": check.num_shards, "whole": len(check.finished),
                   "unfinished": [shard_name(s) for s in check.unfinished],
                   "damaged": {shard_name(s): why for s, why in sorted(check.damaged.items())},
                   "stray": list(check.stray)},
        "samples": {"planned": int(info.get("num_samples", 0)), "attempted": attempted,
                    "written": sum(r["status"] == "ok" for r in records),
                    "filtered": sum(r["status"] == "filtered" for r in records),
                    "failed": sum(r["status"] == "error" for r in records),
                    # planned samples of the shards that are not whole: not generated yet, or to be redone
                    "missing": max(int(info.get("num_samples", 0)) - attempted, 0)},
        "tasks": list(ds.tasks),
        "classes": {t: tally.table(*task_classes(info, t)) for t, tally in classes.items()},
        "ignore_pixels": {t: int(tally.pixels[IGNORE_INDEX]) for t, tally in classes.items()},
        "values": {t: tally.result(task_unit(info, t)) for t, tally in values.items()},
        "quality": quality_summary(records, min_quality),
        "rejected": rejected,
        "backbone": info.get("backbone", {}),
        "heads": info.get("heads", {}),
        "image": {"height": sampling.get("height"), "width": sampling.get("width"),
                  "format": info.get("image_format")},
        "sampling": sampling,
        "bytes": sum(f["bytes"] for st in check.finished.values() for f in st.get("files", {}).values()),
    }
