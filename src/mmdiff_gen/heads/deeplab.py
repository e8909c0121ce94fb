"""DeepLabV3+ decoder with ASPP (Chen et al. 2018), over token-grid feature maps."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn(cin: int, cout: int, k: int = 3, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1×1 branch, one 3×3 branch per rate, and image pooling."""

    def __init__(self, cin: int, cout: int, rates: tuple[int, ...], dropout: float = 0.1):
        super().__init__()
        self.branches = nn.ModuleList([_conv_bn(cin, cout, 1)] + [_conv_bn(cin, cout, 3, r) for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False), nn.ReLU(inplace=True))
        self.project = nn.Sequential(_conv_bn(cout * (len(rates) + 2), cout, 1), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [b(x) for b in self.branches]
        outs.append(self.pool(x).expand(-1, -1, *x.shape[-2:]))
        return self.project(torch.cat(outs, 1))


class DeepLabV3PlusDecoder(nn.Module):
    """DeepLabV3+ over L same-resolution maps: ASPP on all of them, fused with the earliest (most local) one.

    All DiT features share the token grid, so the encoder/decoder resolution gap of DeepLabV3+ is
    made inside the decoder: the ASPP output and the low-level projection meet at `upsample`× the
    token grid, then the logits are resized to the image.

    Args:
        in_channels: channels of each input map (L entries; the first is the low-level one).
        side_channels: channels of side inputs concatenated to every branch (concept maps, extras).
        num_classes: output channels.
        channels: ASPP / decoder width (256 in DeepLabV3+).
        low_channels: low-level projection width (48 in DeepLabV3+).
        aspp_rates: dilation rates at the token grid ((6, 12, 18) suits FLUX's 32×32 grid at 512²).
        upsample: factor from the token grid to the fusion resolution.
    """

    def __init__(self, in_channels: list[int], side_channels: int, num_classes: int, *, channels: int = 256,
                 low_channels: int = 48, aspp_rates: tuple[int, ...] = (6, 12, 18), upsample: int = 2):
        super().__init__()
        self.upsample = upsample
        self.reduce = _conv_bn(sum(in_channels) + side_channels, channels, 1)
        self.aspp = ASPP(channels, channels, aspp_rates)
        self.low = _conv_bn(in_channels[0] + side_channels, low_channels, 1)
        self.fuse = nn.Sequential(_conv_bn(channels + low_channels, channels), _conv_bn(channels, channels))
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, maps: list[torch.Tensor], side: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor:
        """maps: L × (B, C_i, h, w); side: (B, S, h, w) or None; size: output (H, W). Returns (B, K, H, W)."""
        extra = [side] if side is not None else []
        high = self.aspp(self.reduce(torch.cat(maps + extra, 1)))
        up = [s * self.upsample for s in high.shape[-2:]]
        high = F.interpolate(high, size=up, mode="bilinear", align_corners=False)
        low = F.interpolate(self.low(torch.cat([maps[0]] + extra, 1)), size=up, mode="bilinear", align_corners=False)
        logits = self.classifier(self.fuse(torch.cat([high, low], 1)))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
