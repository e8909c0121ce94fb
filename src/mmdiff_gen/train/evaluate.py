"""Score a head on a feature cache with the task's metrics; plain dicts out."""

from __future__ import annotations

import torch

from ..heads.inputs import run_head
from ..heads.model import MMDiffHead, head_precision, predictions
from .feature_cache import FeatureCache
from .metrics import DepthMetrics, SaliencyMetrics, SegMetrics


@torch.no_grad()
def evaluate_head(model: MMDiffHead, task: str, side: str, timesteps: tuple[int, ...] | None, cache: FeatureCache,
                  classes: list[str], batch_size: int = 32, precision: str = "fp32") -> dict:
    """Metrics of `model` on every sample of `cache` (side maps and timesteps as it was trained with), run in
    `precision` (heads.head_precision: "fp32", "bf16" autocast, or "auto")."""
    model.eval()
    device = next(model.parameters()).device
    acc = {"seg": lambda: SegMetrics(len(classes)), "saliency": SaliencyMetrics, "depth": DepthMetrics}[task]()
    for batch in cache.batches(batch_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        with head_precision(device, precision):
            out = run_head(model, side, batch, cache.grid, cache.image_size, timesteps=timesteps,
                           extra=batch["dino"] if model.config.extra_channels else None, source="the cache")
        pred = predictions(task, out).cpu().numpy()
        gt = batch[task].cpu().numpy()
        for p, g in zip(pred, gt):
            acc.update(p, g)
    return acc.result()
