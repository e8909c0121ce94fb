"""Score a head on a feature cache with its tasks' metrics; plain dicts out."""

from __future__ import annotations

import torch

from ..heads.inputs import run_head
from ..heads.model import MMDiffHead, head_precision, predictions
from ..tasks import get as get_task
from .feature_cache import FeatureSource
from .metrics import DepthMetrics, SaliencyMetrics, SegMetrics

# A task's metrics accumulator by its kind, built with the head's class count.
METRICS = {"classes": SegMetrics, "probability": lambda _: SaliencyMetrics(), "positive": lambda _: DepthMetrics()}


@torch.no_grad()
def evaluate_head(model: MMDiffHead, side: str, timesteps: tuple[int, ...] | None, cache: FeatureSource,
                  classes: list[str], batch_size: int = 32, precision: str = "fp32") -> dict[str, dict]:
    """{task: metrics} of `model` on every sample of `cache` for each of its tasks (side maps and timesteps as
    it was trained with), run in `precision` (heads.head_precision: "fp32", "bf16" autocast, or "auto")."""
    model.eval()
    device = next(model.parameters()).device
    tasks = model.config.tasks
    acc = {t: METRICS[get_task(t).kind](len(classes)) for t in tasks}
    for batch in cache.batches(batch_size, device=device):
        with head_precision(device, precision):
            out = run_head(model, side, batch, cache.grid, cache.image_size, timesteps=timesteps,
                           extra=batch["dino"] if model.config.extra_channels else None, source="the cache")
        for t in tasks:
            for p, g in zip(predictions(t, out[t]).cpu().numpy(), batch[t].cpu().numpy()):
                acc[t].update(p, g)
    return {t: a.result() for t, a in acc.items()}
