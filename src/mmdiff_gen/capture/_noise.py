"""Flow-matching forward noising, shared by real-image mode and the contract's extra forward."""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor


def per_sample_noise(shape: tuple[int, ...], generators: list[torch.Generator], device, dtype) -> torch.Tensor:
    """(B, *shape) standard normal noise, row b drawn from generators[b] (reproducible per sample)."""
    return torch.stack([randn_tensor(shape, generator=g, device=device, dtype=dtype) for g in generators])


def noise_to(x0: torch.Tensor, noise: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """x_σ = (1 − σ)·x0 + σ·ε (rectified flow; the same as FlowMatchEulerDiscreteScheduler.scale_noise)."""
    if isinstance(sigma, torch.Tensor):
        sigma = sigma.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return (1 - sigma) * x0 + sigma * noise


def generators_for(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per sample: the same noise on any device, and per-sample reproducibility."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
