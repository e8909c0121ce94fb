"""Per-sample quality signals of synthetic labels: how sure the heads are, and whether two independent
readers of the same pass (the trained decoder and the zero-shot grounding attention) agree.

All functions map a batch to one float per sample in [0, 1]; higher is better.
"""

from __future__ import annotations

import torch


def class_confidence(logits: torch.Tensor) -> torch.Tensor:
    """(B,) mean over pixels of the top softmax probability; logits (B, K, H, W)."""
    return logits.float().softmax(1).amax(1).flatten(1).mean(1)


def probability_confidence(logit: torch.Tensor) -> torch.Tensor:
    """(B,) mean over pixels of |2p − 1|: 0 for a map of undecided 0.5s, 1 for a crisp mask; logit (B, 1, H, W)."""
    return (2 * logit.float().sigmoid() - 1).abs().flatten(1).mean(1)


# A task's confidence signal by its kind (tasks.py); "positive" tasks (depth) have none.
CONFIDENCE = {"classes": class_confidence, "probability": probability_confidence}


def agreement(a: torch.Tensor, b: torch.Tensor, ignore: int = 255) -> torch.Tensor:
    """(B,) mean IoU over the foreground classes present in either map (id 0 = background); 1 when
    both maps are all background. a, b: (B, H, W) integer ids."""
    out = []
    for x, y in zip(a.long(), b.long()):
        valid = (x != ignore) & (y != ignore)
        classes = torch.unique(torch.cat([x[valid], y[valid]]))
        classes = classes[classes != 0]
        if classes.numel() == 0:
            out.append(1.0)
            continue
        ious = [((x == c) & (y == c) & valid).sum() / ((x == c) | (y == c)).logical_and(valid).sum() for c in classes]
        out.append(float(torch.stack(ious).float().mean()))
    return torch.tensor(out)
