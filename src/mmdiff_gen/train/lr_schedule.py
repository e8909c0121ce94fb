"""The learning-rate schedule every training here follows: linear warm-up, then cosine down to a floor."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """LR multiplier at `step` (0-based) of `total`: (step + 1) / warmup over the first `warmup` steps, then a
    cosine from 1 down to `floor`, reached at `total` and kept after it (the toy phases: 0.1; grounding: 0)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
