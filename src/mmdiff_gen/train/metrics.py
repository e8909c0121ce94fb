"""Dense-prediction metrics as small accumulators that return plain dicts.

Segmentation: mIoU from a confusion matrix (ignore index 255). Saliency: S-measure, max F-measure
(β² = 0.3) and MAE through pysodmetrics. Depth: AbsRel, RMSE, δ1–δ3 over valid pixels (depth > 0).
"""

from __future__ import annotations

import numpy as np

IGNORE = 255


class SegMetrics:
    """Confusion-matrix accumulator; `result()` gives mIoU (percent) and per-class IoU."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE):
        self.n = num_classes
        self.ignore = ignore_index
        self.conf = np.zeros((num_classes, num_classes), np.int64)

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """pred, gt: integer class maps of one shape."""
        if pred.shape != gt.shape:
            raise ValueError(f"pred {pred.shape} and gt {gt.shape} differ")
        keep = gt != self.ignore
        p, g = pred[keep].astype(np.int64), gt[keep].astype(np.int64)
        if p.size and (p.max() >= self.n or g.max() >= self.n or p.min() < 0):
            raise ValueError(f"class ids must lie in [0, {self.n}) or be {self.ignore}")
        self.conf += np.bincount(g * self.n + p, minlength=self.n * self.n).reshape(self.n, self.n)

    def result(self) -> dict:
        inter = np.diag(self.conf).astype(np.float64)
        union = self.conf.sum(0) + self.conf.sum(1) - inter
        present = union > 0  # classes never seen nor predicted do not count
        iou = np.where(present, inter / np.maximum(union, 1), np.nan)
        return {"miou": float(np.nanmean(iou) * 100), "iou": [None if np.isnan(v) else float(v * 100) for v in iou]}


class SaliencyMetrics:
    """pysodmetrics accumulators; pred and gt are uint8 maps in 0–255 (gt binarised at 128)."""

    def __init__(self):
        import py_sod_metrics as sod

        self.fm = sod.FmeasureV2(metric_handlers={"fm": sod.FmeasureHandler(with_dynamic=True, with_adaptive=False, beta=0.3)})
        self.sm = sod.Smeasure()
        self.mae = sod.MAE()

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        if pred.shape != gt.shape:
            raise ValueError(f"pred {pred.shape} and gt {gt.shape} differ")
        pred, gt = pred.astype(np.uint8), gt.astype(np.uint8)
        for m in (self.fm, self.sm, self.mae):
            m.step(pred=pred, gt=gt)

    def result(self) -> dict:
        return {
            "s_measure": float(self.sm.get_results()["sm"]),
            "max_f": float(self.fm.get_results()["fm"]["dynamic"].max()),
            "mae": float(self.mae.get_results()["mae"]),
        }


class DepthMetrics:
    """Pixel-pooled depth errors over valid pixels (gt > 0)."""

    def __init__(self):
        self.sums = {"abs_rel": 0.0, "sq_err": 0.0, "d1": 0.0, "d2": 0.0, "d3": 0.0}
        self.count = 0

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        if pred.shape != gt.shape:
            raise ValueError(f"pred {pred.shape} and gt {gt.shape} differ")
        valid = gt > 0
        p = np.maximum(pred[valid].astype(np.float64), 1e-6)
        g = gt[valid].astype(np.float64)
        ratio = np.maximum(p / g, g / p)
        self.sums["abs_rel"] += float((np.abs(p - g) / g).sum())
        self.sums["sq_err"] += float(((p - g) ** 2).sum())
        for k, th in (("d1", 1.25), ("d2", 1.25**2), ("d3", 1.25**3)):
            self.sums[k] += float((ratio < th).sum())
        self.count += int(valid.sum())

    def result(self) -> dict:
        n = max(self.count, 1)
        return {
            "abs_rel": self.sums["abs_rel"] / n,
            "rmse": float(np.sqrt(self.sums["sq_err"] / n)),
            "d1": self.sums["d1"] / n,
            "d2": self.sums["d2"] / n,
            "d3": self.sums["d3"] / n,
        }
