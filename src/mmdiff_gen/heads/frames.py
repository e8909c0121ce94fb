"""From a video head's predictions per latent frame to one per decoded frame.

A causal video VAE (Wan's) encodes a clip of F = s·(f − 1) + 1 frames into f latent frames: latent frame 0 holds
frame 0 alone, latent frame j ≥ 1 the s frames s·(j − 1) + 1 … s·j (s = 4). Each latent frame's prediction is placed
at the centre of the frames it holds (0, then s·(j − 1) + (s + 1)/2) and every decoded frame takes the linear
interpolation of the two predictions around it in time (the first and the last latent frame's beyond them), before
any argmax: class logits, probability logits and depth move smoothly from one latent frame to the next instead of
jumping every s frames.
"""

from __future__ import annotations

import numpy as np
import torch


def latent_centres(latent_frames: int, frames: int) -> np.ndarray:
    """(f,) the decoded-frame time of each latent frame's centre; ValueError unless frames = s·(f − 1) + 1."""
    f = int(latent_frames)
    if f == 1:
        if frames != 1:
            raise ValueError(f"one latent frame decodes to one frame, not {frames}")
        return np.zeros(1)
    s, rest = divmod(frames - 1, f - 1)
    if rest or s < 1:
        raise ValueError(f"{frames} frames are not s·({f} − 1) + 1 for a whole temporal factor s")
    return np.concatenate([[0.0], s * np.arange(f - 1) + (s + 1) / 2])


def to_frames(x: torch.Tensor, frames: int) -> torch.Tensor:
    """(B, f, ...) per latent frame → (B, frames, ...) per decoded frame, linearly interpolated in time."""
    centres = latent_centres(x.shape[1], frames)
    t = np.arange(frames, dtype=np.float64)
    hi = np.clip(np.searchsorted(centres, t, side="right"), 1, max(1, len(centres) - 1))
    lo = hi - 1
    if len(centres) == 1:
        return x.expand(-1, frames, *x.shape[2:])
    w = np.clip((t - centres[lo]) / (centres[hi] - centres[lo]), 0.0, 1.0)
    w = torch.as_tensor(w, dtype=x.dtype, device=x.device).view(1, frames, *[1] * (x.dim() - 2))
    return x[:, torch.as_tensor(lo, device=x.device)] * (1 - w) + x[:, torch.as_tensor(hi, device=x.device)] * w
