"""One loss per task kind (tasks.py): cross-entropy for classes (segmentation), BCE + soft IoU for probabilities
(saliency), the scale-invariant log loss for positive values (depth)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .metrics import IGNORE


def seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """logits (B, K, H, W), target (B, H, W) long with 255 = ignore."""
    return F.cross_entropy(logits, target.long(), ignore_index=IGNORE)


def saliency_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """logits (B, 1, H, W), target (B, H, W) in 0–255. BCE plus a soft IoU term for whole-object masks."""
    t = (target.float() / 255).unsqueeze(1)
    p = logits.sigmoid()
    inter = (p * t).sum((2, 3))
    union = (p + t - p * t).sum((2, 3))
    return F.binary_cross_entropy_with_logits(logits, t) + (1 - (inter + 1) / (union + 1)).mean()


def depth_loss(pred: torch.Tensor, target: torch.Tensor, lam: float = 0.85) -> torch.Tensor:
    """Scale-invariant log loss (Eigen et al. 2014) over valid pixels; pred (B, 1, H, W) ≥ 0, target (B, H, W) metres."""
    valid = target > 0
    d = pred[:, 0].clamp(min=1e-3).log() - target.clamp(min=1e-3).log()
    d = torch.where(valid, d, torch.zeros_like(d))
    n = valid.flatten(1).sum(1).clamp(min=1)
    mean = d.flatten(1).sum(1) / n
    sq = d.square().flatten(1).sum(1) / n
    return torch.sqrt((sq - lam * mean.square()).clamp(min=1e-8)).mean() * 10


LOSSES = {"classes": seg_loss, "probability": saliency_loss, "positive": depth_loss}  # by task kind
