"""Real-image mode: VAE-encode existing images, noise them to each target sigma, one batched forward."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..backbones.base import Backbone
from ._noise import generators_for, noise_to, per_sample_noise
from .session import Capture, CaptureResult
from .spec import CaptureSpec


@torch.no_grad()
def extract(
    backbone: Backbone,
    images: Any,
    spec: CaptureSpec,
    *,
    captions: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    guidance_scale: float | None = None,
    max_sequence_length: int | None = None,
) -> CaptureResult:
    """Features and maps of existing images, as generation would have captured them.

    Each image is encoded to x0, noised to every target sigma with one noise draw per image
    (x_σ = (1 − σ)·x0 + σ·ε), and all B·T noised latents go through the transformer in one forward.

    Args:
        backbone: the wrapped pipeline.
        images: a list of PIL images or a (B, 3, H, W) tensor in [0, 1]; all of one size, a multiple
            of the backbone's pixels per token. A video backbone's: clips (lists of PIL frames, or a (B, F, 3, H, W)
            tensor in [0, 1]), real-video mode.
        spec: what to capture.
        captions: one caption per image (the prompt the features are conditioned on); None = empty.
        seeds: one noise seed per image; None = 0, 1, 2, …
        guidance_scale: FLUX.1-dev's distilled guidance value, as used in generation (None: the backbone's).
    """
    pixels = backbone.preprocess(images)  # (B, 3, H, W) in [−1, 1]; a video backbone's (B, 3, F, H, W)
    b, height, width = pixels.shape[0], *pixels.shape[-2:]
    frames = pixels.shape[2] if backbone.VIDEO else None
    captions = [""] * b if captions is None else list(captions)
    seeds = list(range(b)) if seeds is None else [int(s) for s in seeds]
    if len(captions) != b or len(seeds) != b:
        raise ValueError(f"need one caption and one seed per image: {b} images, {len(captions)} captions, {len(seeds)} seeds")
    t = len(spec.sigmas)
    s = backbone.sampling_kwargs(guidance_scale=guidance_scale, max_sequence_length=max_sequence_length)
    guidance_scale, max_sequence_length = s["guidance_scale"], s["max_sequence_length"]

    x0 = backbone.encode_images(pixels)  # (B, N, C_lat) packed (FLUX) or (B, C_lat, h, w) (SD3)
    noise = per_sample_noise(tuple(x0.shape[1:]), generators_for(seeds), x0.device, x0.dtype)
    sigma = torch.tensor(spec.sigmas, dtype=torch.float32, device=x0.device).repeat_interleave(b)  # (T·B,) sigma-major
    rep = (t,) + (1,) * (x0.dim() - 1)
    latents = noise_to(x0.repeat(rep), noise.repeat(rep), sigma)

    cond = backbone.encode_prompts(captions, max_sequence_length)
    cond = {k: (v.repeat(t, *[1] * (v.dim() - 1)) if k != "txt_ids" else v) for k, v in cond.items()}
    text_mask = backbone.text_token_mask(captions, max_sequence_length) if spec.cross_attention else None
    inputs = backbone.transformer_inputs(latents, sigma, cond, guidance_scale, height, width)
    with Capture(backbone, spec, batch_size=b, height=height, width=width, frames=frames, text_mask=text_mask,
                 planned=True) as cap:
        cap.arm([s for s in spec.sigmas for _ in range(b)])  # sigma-major rows: target j is rows j·B … (j+1)·B − 1
        backbone.transformer(**inputs)
        cap.collect()
    return cap.result()
