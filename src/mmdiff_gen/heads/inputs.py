"""From captured tensors to head inputs: choose timesteps, average maps over them, lay them on the grid."""

from __future__ import annotations

import torch


def head_inputs(features: torch.Tensor, grid: tuple[int, int], timesteps: list[int] | None = None,
                concept_maps: torch.Tensor | None = None, cross_attention: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Select timesteps and build the side maps.

    Args:
        features: (B, L, T, N, C).
        grid: (h, w), N = h·w.
        timesteps: indices along T to keep (None: all).
        concept_maps: (B, T, K, N) or None; averaged over the kept timesteps (MMDiff §3.2).
        cross_attention: (B, T, N) or None; averaged over the kept timesteps, min–max normalised per
            image (its raw values are tiny attention probabilities).
    Returns:
        features (B, L, T', N, C) and side maps (B, K (+1), h, w) or None.
    """
    idx = list(range(features.shape[2])) if timesteps is None else list(timesteps)
    feats = features[:, :, idx]
    sides = []
    if concept_maps is not None:
        sides.append(concept_maps[:, idx].float().mean(1))  # (B, K, N)
    if cross_attention is not None:
        m = cross_attention[:, idx].float().mean(1)  # (B, N)
        lo, hi = m.amin(1, keepdim=True), m.amax(1, keepdim=True)
        sides.append(((m - lo) / (hi - lo).clamp(min=1e-12)).unsqueeze(1))
    if not sides:
        return feats, None
    side = torch.cat(sides, 1)
    return feats, side.reshape(side.shape[0], side.shape[1], *grid)
