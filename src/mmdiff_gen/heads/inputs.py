"""From captured tensors to head inputs: choose timesteps, average maps over them, lay them on the grid; and the
one way a head is run on them, whether they come from a generation pass or from a feature-cache batch."""

from __future__ import annotations

import torch
from torch import nn

# The side maps a head reads beside the features (MMDiff §3.2 concept attention; the averaged cross-attention
# baseline of the ablation).
SIDES = ("concepts", "cross", "both", "none")


def check_side(side: str) -> str:
    if side not in SIDES:
        raise KeyError(f"side must be one of {', '.join(SIDES)}, got {side!r}")
    return side


def reads_concepts(side: str) -> bool:
    return check_side(side) in ("concepts", "both")


def reads_cross(side: str) -> bool:
    return check_side(side) in ("cross", "both")


def side_maps(side: str, inputs: dict, source: str = "the input") -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(concept_maps, cross_attention) of `inputs` that a head with this `side` reads; ValueError naming `source`
    (a cache, a capture) when one it needs is missing."""
    cm = inputs.get("concept_maps") if reads_concepts(side) else None
    ca = inputs.get("cross_attention") if reads_cross(side) else None
    if reads_concepts(side) and cm is None:
        raise ValueError(f"{source} has no concept maps: capture or extract it with concepts")
    if reads_cross(side) and ca is None:
        raise ValueError(f"{source} has no cross-attention maps: capture or extract it with cross_attention")
    return cm, ca


def run_head(model: nn.Module, side: str, inputs: dict, grid: tuple[int, int], size: tuple[int, int], *,
             timesteps: list[int] | tuple[int, ...] | None = None, extra: torch.Tensor | None = None,
             source: str = "the input") -> torch.Tensor:
    """Run a head on captured tensors: select its timesteps, build its side maps, predict at `size` (H, W).

    `inputs` holds features (B, L, T, N, C) of exactly the head's layers, and as its `side` needs,
    concept_maps (B, T, K, N) of exactly its concepts and cross_attention (B, T, N): a feature-cache batch
    (training, evaluation) or what `Annotator` picks out of a generation pass. `extra`: (B, E, h, w) DINOv3 maps.
    """
    cm, ca = side_maps(side, inputs, source)
    feats, maps = head_inputs(inputs["features"], grid, list(timesteps) if timesteps else None, cm, ca)
    return model(feats, grid, size, concepts=maps, extra=extra)


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
