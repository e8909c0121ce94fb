"""A DPT-style decoder (Ranftl et al. 2021): reassemble layers to a pyramid, fuse coarse to fine.

One trunk; the task's kind lives in a small tail (positive: one non-negative channel; probability: one logit).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResidualConvUnit(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class FusionBlock(nn.Module):
    """Add the (refined) skip to the coarser path, refine, upsample ×2."""

    def __init__(self, channels: int):
        super().__init__()
        self.skip = ResidualConvUnit(channels)
        self.out = ResidualConvUnit(channels)
        self.project = nn.Conv2d(channels, channels, 1)

    def forward(self, path: torch.Tensor | None, skip: torch.Tensor) -> torch.Tensor:
        # Unlike DPT's first refinenet, the coarsest skip is refined too: no unused parameters (DDP-safe).
        x = self.skip(skip) if path is None else self.skip(skip) + path
        x = F.interpolate(self.out(x), scale_factor=2, mode="bilinear", align_corners=False)
        return self.project(x)


def _reassemble(cin: int, cout: int, scale: float) -> nn.Module:
    """Resample a token-grid map by `scale` ∈ {4, 2, 1, 0.5, …} (DPT's hierarchical reassembly)."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 1)]
    if scale > 1:
        s = int(scale)
        layers.append(nn.ConvTranspose2d(cout, cout, s, stride=s))
    elif scale < 1:
        s = int(round(1 / scale))
        layers.append(nn.Conv2d(cout, cout, 3, stride=s, padding=1))
    return nn.Sequential(*layers)


TAILS = {  # by task kind (tasks.py)
    "positive": lambda c: nn.Sequential(nn.Conv2d(c, c // 2, 3, padding=1), nn.ReLU(), nn.Conv2d(c // 2, 1, 1), nn.Softplus()),
    "probability": lambda c: nn.Sequential(nn.Conv2d(c, c // 2, 3, padding=1), nn.ReLU(), nn.Conv2d(c // 2, 1, 1)),
}


class DPTDecoder(nn.Module):
    """DPT trunk with a task tail.

    Layer i (earliest first) is reassembled at scale 2^(L−2−i) of the token grid (×4, ×2, ×1, ×½
    for L = 4: shallow layers carry the fine detail), fused coarse to fine, then the tail runs at
    the finest scale and the output is resized to the image.

    Args:
        in_channels: channels of each of the L input maps.
        side_channels: channels concatenated to every input map (concept maps, extras).
        tail: the task's kind: "positive" (1 channel, ≥ 0; depth) or "probability" (1 logit; saliency).
        channels: trunk width (256 in DPT).
    """

    def __init__(self, in_channels: list[int], side_channels: int, tail: str, *, channels: int = 256):
        super().__init__()
        if tail not in TAILS:
            raise KeyError(f"unknown DPT tail {tail!r}; known: {', '.join(TAILS)}")
        n = len(in_channels)
        self.scales = [2.0 ** (n - 2 - i) for i in range(n)]
        self.reassemble = nn.ModuleList(
            _reassemble(c + side_channels, channels, s) for c, s in zip(in_channels, self.scales)
        )
        self.fusion = nn.ModuleList(FusionBlock(channels) for _ in range(n))
        self.tail = TAILS[tail](channels)

    def forward(self, maps: list[torch.Tensor], side: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor:
        """maps: L × (B, C_i, h, w); side: (B, S, h, w) or None. Returns (B, 1, H, W)."""
        feats = [r(torch.cat([m, side], 1) if side is not None else m) for r, m in zip(self.reassemble, maps)]
        path = None
        for fuse, skip in zip(reversed(self.fusion), reversed(feats)):  # coarsest first
            if path is not None and path.shape[-2:] != skip.shape[-2:]:
                path = F.interpolate(path, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            path = fuse(path, skip)
        return F.interpolate(self.tail(path), size=size, mode="bilinear", align_corners=False)
