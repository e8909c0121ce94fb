"""CBAM (Woo et al. 2018): channel attention, then spatial attention."""

from __future__ import annotations

import torch
from torch import nn


class CBAM(nn.Module):
    """Convolutional Block Attention Module.

    Args:
        channels: C of the (B, C, H, W) input.
        reduction: bottleneck ratio of the channel MLP.
        kernel_size: spatial-attention convolution size.
    """

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7):
        super().__init__()
        hidden = max(4, channels // reduction)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1))
        self.spatial = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.mlp(x.mean((2, 3), keepdim=True))
        mx = self.mlp(x.amax((2, 3), keepdim=True))
        x = x * torch.sigmoid(avg + mx)  # (B, C, 1, 1) channel weights
        s = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
        return x * torch.sigmoid(self.spatial(s))  # (B, 1, H, W) spatial weights
