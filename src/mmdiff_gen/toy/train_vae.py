"""Phase 1 of the toy recipe: the 16-channel AutoencoderKL, with an edge-weighted reconstruction loss."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ._loop import Phase, conv_autocast
from .data import SceneArrays, boundary_weight
from .recipe import ToyRecipe


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 → (N, 3, H, W) float in [−1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def train_vae(vae, data: SceneArrays, recipe: ToyRecipe, work: Path, steps: int | None = None) -> None:
    """Train `vae` in place, resuming from work/vae.state.safetensors; sets its latent shift and scale at the end."""
    steps = recipe.vae_steps if steps is None else steps
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    phase = Phase(work, "vae", {"model": vae, "opt": opt}, steps, lr=recipe.vae_lr, warmup=100)
    gen = torch.Generator().manual_seed(recipe.seed + 1 + phase.start)
    vae.train().requires_grad_(True)
    for _ in phase:
        idx = torch.randint(0, len(data), (recipe.vae_batch,), generator=gen).numpy()
        x = to_pixels(data.images[idx])
        weight = torch.from_numpy(boundary_weight(data.seg[idx], recipe.vae_edge_weight))[:, None]
        phase.step(vae_loss(vae, x, weight, recipe.vae_kl, gen))
    vae.eval()
    set_latent_stats(vae, data)


def vae_loss(vae, x: torch.Tensor, weight: torch.Tensor, kl: float, gen: torch.Generator) -> torch.Tensor:
    """Boundary-weighted L1 + L2 reconstruction of a posterior sample, plus `kl` × the KL per latent element: pixels x
    (B, 3, H, W) or clips (B, 3, F, H, W) in [−1, 1], `weight` broadcast over the channels."""
    with conv_autocast():
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
    err = rec.float() - x
    return (weight * err.abs()).mean() + (weight * err.square()).mean() + kl * post.kl().float().mean() / z[0].numel()


@torch.no_grad()
def encode_mean(vae, images: np.ndarray) -> torch.Tensor:
    """(N, C, h, w) float32 posterior means of uint8 images."""
    with conv_autocast():
        return vae.encode(to_pixels(images)).latent_dist.mean.float()


@torch.no_grad()
def set_latent_stats(vae, data: SceneArrays, n: int = 1024) -> None:
    """Record the latent mean and 1/std as the VAE's shift_factor / scaling_factor (as FLUX's VAE does)."""
    lat = torch.cat([encode_mean(vae, data.images[i : i + 128]) for i in range(0, min(n, len(data)), 128)])
    vae.register_to_config(shift_factor=float(lat.mean()), scaling_factor=float(1 / lat.std()))


@torch.no_grad()
def reconstruction_psnr(vae, images: np.ndarray) -> float:
    """Mean PSNR (dB) of VAE reconstructions (posterior mean) on uint8 images."""
    x = to_pixels(images)
    rec = torch.cat([vae.decode(vae.encode(x[i : i + 128]).latent_dist.mean).sample for i in range(0, len(x), 128)])
    mse = ((rec.clamp(-1, 1) - x) / 2).square().flatten(1).mean(1)
    return float((10 * torch.log10(1 / mse)).mean())
