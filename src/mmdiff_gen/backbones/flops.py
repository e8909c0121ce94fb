"""FLOPs counted by torch's FlopCounterMode on the meta device: no weights, no memory, any size.

What `train --recipe` prints before it starts (GPU-hours of extraction and training) and what bench/generate_job.py
compares the heads against both come from here. The counter sees matrix products, convolutions and attention — the
FLOPs that set a transformer's time — not element-wise work."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import torch
from torch import nn

from .base import Backbone


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the torch ops `fn` runs; call it on meta tensors and modules so nothing is computed or allocated."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def meta_transformer(transformer: nn.Module) -> nn.Module:
    """A copy of `transformer`'s architecture on the meta device, built from its config (weights never read)."""
    with torch.device("meta"):
        return type(transformer).from_config(transformer.config)


def forward_flops(backbone: Backbone, *, rows: int, height: int, width: int, text_tokens: int | None = None,
                  frames: int | None = None) -> int:
    """FLOPs of one forward of the backbone's transformer on `rows` rows of height × width latents (real-image
    extraction passes images × sigmas rows in one forward), the text padded to `text_tokens` (None: as extraction
    pads it, the backbone's sampling `max_sequence_length`; a family whose text is not padded, its
    `FLOP_TEXT_TOKENS`); a video family's clips of `frames` frames (None: its default). Counted on a meta copy built
    from its config: the
    loaded backbone and `loading.meta_backbone` give the same count. Linear in `rows`."""
    if rows < 1:
        raise ValueError(f"rows must be ≥ 1, got {rows}")
    if text_tokens is None:
        text_tokens = backbone.FLOP_TEXT_TOKENS or backbone.sampling_kwargs()["max_sequence_length"]
    model = meta_transformer(backbone.transformer)
    inputs = backbone.meta_inputs(rows, height, width, text_tokens, **({"frames": frames} if frames else {}))
    with torch.no_grad():
        return count_flops(lambda: model(**inputs))


def config_backbone(adapter: type[Backbone], transformer_class: str, config: dict, *, vae_scale_factor: int,
                    name: str, settings: dict | None = None, weights_id: str = "") -> Backbone:
    """A family adapter around a transformer built on the meta device from its config, without any weights: the
    geometry (token grid, feature width, default layers), identity and FLOP counts of the loaded backbone.

    Args:
        adapter: the family adapter (FluxBackbone, SD3Backbone).
        transformer_class: the diffusers class named in transformer/config.json ("FluxTransformer2DModel").
        config: that config (e.g. backbones.flux.FLUX_DEV, or the file's contents).
        vae_scale_factor: pixels per latent pixel, as the pipeline computes it from the VAE (2^(blocks − 1)).
        name, settings, weights_id: as the loaded backbone records them (its identity).
    """
    import diffusers

    with torch.device("meta"):
        transformer = getattr(diffusers, transformer_class).from_config(config)
    # The adapter reads of a pipeline only its transformer and VAE scale here (test_flux_dev_meta does the same).
    pipe = SimpleNamespace(transformer=transformer, vae_scale_factor=int(vae_scale_factor))
    return adapter(pipe, name=name, settings=settings, weights_id=weights_id)
