"""FLUX.1 (FluxPipeline): image features from single-stream blocks, concepts through double-stream blocks."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from .base import Backbone, meta
from .runtime import onloaded

# black-forest-labs/FLUX.1-dev transformer/config.json: builds the real architecture on the meta
# device (geometry tests, FLOP counts) without the weights.
FLUX_DEV = dict(
    attention_head_dim=128, guidance_embeds=True, in_channels=64, joint_attention_dim=4096, num_attention_heads=24,
    num_layers=19, num_single_layers=38, patch_size=1, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56),
)


class FluxBackbone(Backbone):
    """FluxPipeline adapter.

    Facts it encodes (diffusers 0.42): blocks return (text, image); the transformer's `timestep`
    is the sigma itself; image tokens are row-major over the 2×2-packed latent grid; text
    positions are all zero, so RoPE is the identity on text and concept tokens.
    """

    family = "flux"
    FLOAT16_OK = False  # massive activations beyond ±65504

    @property
    def feature_blocks(self) -> nn.ModuleList:
        return self.transformer.single_transformer_blocks

    @property
    def joint_blocks(self) -> nn.ModuleList:
        return self.transformer.transformer_blocks

    def image_tokens(self, block_output: Any) -> torch.Tensor:
        return block_output[1]  # (text, image) → image, (B, N, C)

    def sigma_of(self, timestep: torch.Tensor) -> torch.Tensor:
        return timestep

    def timestep_for(self, sigma: float) -> float:
        return sigma

    @property
    def pixels_per_token(self) -> int:
        # FLUX packs 2×2 latent pixels into one token; transformer patch_size is 1.
        return int(self.pipe.vae_scale_factor) * 2 * int(self.transformer.config.patch_size)

    # --- text side --------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], max_sequence_length: int = 512) -> dict[str, torch.Tensor]:
        """Transformer conditioning kwargs for a list of prompts (the pipeline's own encoder)."""
        embeds, pooled, text_ids = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, device=self.device, max_sequence_length=max_sequence_length
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": text_ids}

    def text_token_mask(self, prompts: Sequence[str], max_sequence_length: int = 512) -> torch.Tensor:
        """(B, S) bool: which T5 positions hold prompt tokens rather than padding."""
        tok = self.pipe.tokenizer_2(
            list(prompts), padding="max_length", max_length=max_sequence_length, truncation=True, return_tensors="pt"
        )
        return tok.attention_mask.bool()

    def _encode_concepts(self, words: tuple[str, ...]) -> torch.Tensor:
        """ConceptAttention's: each concept encoded alone with T5, output token 0 kept (one token per concept), through
        the transformer's context embedder, like the prompt."""
        tok = self.pipe.tokenizer_2(list(words), padding="longest", return_tensors="pt")
        # Inputs on the execution device, as the pipeline's encode_prompt: under offload t5.device is cpu or meta.
        hidden = self.pipe.text_encoder_2(tok.input_ids.to(self.device), output_hidden_states=False)[0]  # (K, S, D_t5)
        first = hidden[:, 0].to(device=self.device, dtype=self.dtype)  # (K, D_t5)
        with onloaded(self.transformer):  # model offload: the embedder runs outside the transformer's forward
            return self.transformer.context_embedder(first)  # (K, C)

    def concept_temb(self, timestep: torch.Tensor, guidance: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """(B, C) modulation for the concept stream: time (+ guidance) embedding, zero pooled text, in the
        transformer's compute `dtype` (resolved once by the caller: this runs inside compiled graphs)."""
        tr = self.transformer
        t = timestep.to(dtype) * 1000  # mirrors FluxTransformer2DModel.forward
        pooled = torch.zeros(t.shape[0], tr.config.pooled_projection_dim, device=t.device, dtype=dtype)
        if guidance is None:
            return tr.time_text_embed(t, pooled)
        return tr.time_text_embed(t, guidance.to(dtype) * 1000, pooled)

    # --- latents ----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Clean packed latents x0 (B, N, 4·C_vae) from images (B, 3, H, W) in [−1, 1]."""
        lat = self.vae_latents(images)
        b, c, h, w = lat.shape
        return self.pipe._pack_latents(lat, b, c, h, w).to(self.dtype)

    def image_ids(self, height: int, width: int) -> torch.Tensor:
        """(N, 3) RoPE position ids of the image tokens at this size."""
        h, w = self.token_grid(height, width)
        return self.pipe._prepare_latent_image_ids(1, h, w, self.device, self.dtype)

    def position_inputs(self, rows: int, height: int, width: int) -> dict[str, Any]:
        return {"img_ids": self.image_ids(height, width)}

    def meta_inputs(self, rows: int, height: int, width: int, text_tokens: int) -> dict[str, Any]:
        cfg = self.transformer.config
        n = math.prod(self.token_grid(height, width))  # packed image tokens

        return {"hidden_states": meta(rows, n, cfg.in_channels), "timestep": meta(rows),
                "guidance": meta(rows) if cfg.guidance_embeds else None,
                "pooled_projections": meta(rows, cfg.pooled_projection_dim),
                "encoder_hidden_states": meta(rows, text_tokens, cfg.joint_attention_dim),
                "txt_ids": meta(text_tokens, 3), "img_ids": meta(n, 3), "return_dict": False}
