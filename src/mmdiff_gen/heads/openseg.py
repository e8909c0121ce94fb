"""Seg4Diff's zero-shot open-vocabulary segmentation from one layer's image→text attention (no training).

Each class's map is the attention its sub-word tokens receive, averaged over those tokens; each map
is min–max normalised per image (attention to different words lives on different scales); a pixel
takes the class of the highest map, or background (id 0) when that map is below `threshold` — the
background rule: Seg4Diff's argmax has no background, and a generated image is mostly background.
Only classes the prompt names can be found: their tokens are where the attention is read.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class OpenSegConfig:
    """Where and how to read the grounding attention.

    Args:
        classes: class names; id i is classes[i]. Name 0 is the background (never looked up).
        layer: Backbone.attention_blocks index (the "expert" layer `probe-layers` finds).
        sigma: the capture sigma whose attention is read.
        threshold: normalised attention below which a pixel is background.
    """

    classes: tuple[str, ...]
    layer: int
    sigma: float
    threshold: float = 0.5

    def __post_init__(self):
        object.__setattr__(self, "classes", tuple(self.classes))
        if len(self.classes) < 2:
            raise ValueError("open-vocabulary segmentation needs a background name and at least one class")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {self.threshold}")

    def to_dict(self) -> dict:
        return asdict(self)


def class_maps(attention: torch.Tensor, positions: list[dict[int, list[int]]], num_classes: int) -> torch.Tensor:
    """(B, K, N) normalised per-class maps, NaN for classes a prompt does not name.

    Args:
        attention: (B, N, S) image→text attention of one layer at one sigma.
        positions: per sample, class id → text positions of its sub-word tokens (all occurrences).
        num_classes: K, including the background at 0 (its row stays NaN).
    """
    b, n, _ = attention.shape
    maps = attention.new_full((b, num_classes, n), float("nan"), dtype=torch.float32)
    for i, pos in enumerate(positions):
        for c, tokens in pos.items():
            m = attention[i, :, tokens].float().mean(-1)  # (N,)
            lo, hi = m.min(), m.max()
            maps[i, c] = (m - lo) / (hi - lo).clamp(min=1e-12)
    return maps


def segment(maps: torch.Tensor, grid: tuple[int, int], size: tuple[int, int], threshold: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Label ids (B, H, W) uint8 and the winning normalised score (B, H, W) float32 from class maps.

    Maps are upsampled bilinearly from the token grid before the argmax, so boundaries are not
    token-blocky; background is 0 where the best map is below `threshold` or no class is named.
    """
    b, k, _ = maps.shape
    up = F.interpolate(maps.view(b, k, *grid).nan_to_num(-1.0), size=size, mode="bilinear", align_corners=False)
    score, ids = up.max(1)
    ids = torch.where(score >= threshold, ids, torch.zeros_like(ids))
    return ids.to(torch.uint8), score.clamp(min=0)
