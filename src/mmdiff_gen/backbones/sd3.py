"""Stable Diffusion 3 / 3.5 (StableDiffusion3Pipeline): every block is a joint (MM-DiT) block."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .base import JointBlocksBackbone, meta
from .runtime import onloaded

# stabilityai/stable-diffusion-3.5-large transformer/config.json: the real architecture on the meta
# device (geometry tests) without the weights.
SD35_LARGE = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64, num_attention_heads=38,
    joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192, qk_norm="rms_norm",
)


class SD3Backbone(JointBlocksBackbone):
    """StableDiffusion3Pipeline adapter (SD3-medium, SD3.5-medium / large).

    Facts it encodes (diffusers 0.42): there are no single-stream blocks, so features and the
    concept stream both come from `transformer_blocks` (JointTransformerBlock), which return
    (text, image); the last block is `context_pre_only` and returns None for text. Attention
    concatenates [image, text] (FLUX: [text, image]) and has no RoPE. The transformer gets the
    timestep on the 1000 scale. With CFG one call carries [uncond; cond] rows. Image tokens are the
    row-major patches of the (unpacked) latent, `patch_size` latent pixels per side.
    """

    family = "sd3"
    MAX_SHIFT_DEFAULT = 1.16
    # SD3's own defaults (guidance_scale is real CFG here), where neither caller nor mmdiff.json says.
    SAMPLING_DEFAULTS = {"height": 1024, "width": 1024, "num_inference_steps": 28, "guidance_scale": 7.0,
                         "true_cfg_scale": 1.0, "negative_prompt": None}

    def sigma_of(self, timestep: torch.Tensor) -> torch.Tensor:
        return timestep / 1000

    def timestep_for(self, sigma: float) -> float:
        return sigma * 1000

    @property
    def pixels_per_token(self) -> int:
        return int(self.pipe.vae_scale_factor) * int(self.transformer.config.patch_size)

    @property
    def size_range(self) -> tuple[int, int]:
        """SD3's positional embedding is cropped from a fixed `pos_embed_max_size` grid: larger images fail."""
        cap = self.transformer.config.get("pos_embed_max_size") or 96
        return 2 * self.pixels_per_token, int(cap) * self.pixels_per_token

    @property
    def max_sequence_length(self) -> int:
        """T5 tokens after the 77 CLIP tokens: the T5 tokenizer's limit, at most the pipeline's 256."""
        return int(min(256, getattr(self.t5_tokenizer, "model_max_length", 256) or 256))

    @property
    def t5_tokenizer(self):
        """SD3's T5 is its third text input (the second tokenizer is CLIP-G's); None without it."""
        return getattr(self.pipe, "tokenizer_3", None)

    # --- sampling ---------------------------------------------------------------------------
    def cfg_in_batch(self, sampling: dict) -> bool:
        # StableDiffusion3Pipeline: do_classifier_free_guidance = guidance_scale > 1, and then
        # latent_model_input = cat([latents] * 2) with prompt embeds [negative; positive].
        return float(sampling.get("guidance_scale", self.SAMPLING_DEFAULTS["guidance_scale"])) > 1

    def pipeline_kwargs(self, sampling: dict) -> dict:
        kw = dict(sampling)
        if kw.pop("true_cfg_scale", 1.0) not in (None, 1, 1.0):
            raise ValueError("SD3's guidance_scale is already true classifier-free guidance: leave true_cfg_scale at 1")
        return kw

    # --- text side --------------------------------------------------------------------------
    def grounding_tokenizer(self):
        """CLIP-L's 77 tokens open the joint context (Seg4Diff reads SD3's CLIP part)."""
        return self.pipe.tokenizer, 0, self.pipe.tokenizer_max_length

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], max_sequence_length: int = 256) -> dict[str, torch.Tensor]:
        """Transformer conditioning kwargs for a list of prompts (the pipeline's own encoders, no CFG)."""
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=self.device,
            do_classifier_free_guidance=False, max_sequence_length=max_sequence_length,
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def text_token_mask(self, prompts: Sequence[str], max_sequence_length: int = 256) -> torch.Tensor:
        """(B, 77 + S) bool over the joint context [CLIP; T5]: which positions hold prompt tokens.

        The CLIP part is 77 tokens padded to the max length; the T5 part is padding when the
        pipeline runs without T5 (`text_encoder_3=None`, zeros)."""
        clip = self.pipe.tokenizer(list(prompts), padding="max_length", max_length=self.pipe.tokenizer_max_length,
                                   truncation=True, return_tensors="pt").attention_mask.bool()
        if self.pipe.text_encoder_3 is None:
            t5 = torch.zeros(clip.shape[0], max_sequence_length, dtype=torch.bool)
        else:
            t5 = self.pipe.tokenizer_3(list(prompts), padding="max_length", max_length=max_sequence_length,
                                       truncation=True, return_tensors="pt").attention_mask.bool()
        return torch.cat([clip, t5], dim=1)

    def _encode_concepts(self, words: tuple[str, ...]) -> torch.Tensor:
        """Each word encoded alone, one token kept, through the context embedder (ConceptAttention's recipe). The
        token is T5's first output when the pipeline has T5, else the first word token of the CLIP part (position
        1, after BOS)."""
        embeds = self.encode_prompts(list(words), max_sequence_length=8)["encoder_hidden_states"]  # (K, 77+8, D)
        pos = self.pipe.tokenizer_max_length if self.pipe.text_encoder_3 is not None else 1
        with onloaded(self.transformer):  # model offload: the embedder runs outside the transformer's forward
            return self.transformer.context_embedder(embeds[:, pos].to(self.dtype))

    def concept_temb(self, timestep: torch.Tensor, guidance: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """(B, C) modulation for the concept stream: time embedding with a zero pooled projection."""
        tr = self.transformer
        pooled = torch.zeros(timestep.shape[0], tr.config.pooled_projection_dim, device=timestep.device,
                             dtype=dtype)
        return tr.time_text_embed(timestep, pooled)  # float32 as SD3Transformer2DModel.forward passes it

    # --- latents ----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Clean latents x0 (B, C_vae, H/8, W/8) from images (B, 3, H, W) in [−1, 1]: SD3 patchifies inside."""
        return self.vae_latents(images).to(self.dtype)

    def timestep_input(self, sigma: torch.Tensor) -> torch.Tensor:
        return (sigma * 1000).to(device=self.device, dtype=torch.float32)  # the 1000 scale, float32 as the pipeline

    def meta_inputs(self, rows: int, height: int, width: int, text_tokens: int) -> dict[str, Any]:
        cfg = self.transformer.config
        h, w = self.token_grid(height, width)
        p = int(cfg.patch_size)
        clip = int(getattr(self.pipe, "tokenizer_max_length", 77))  # the CLIP tokens before T5's in the context

        return {"hidden_states": meta(rows, cfg.in_channels, h * p, w * p), "timestep": meta(rows),
                "pooled_projections": meta(rows, cfg.pooled_projection_dim),
                "encoder_hidden_states": meta(rows, clip + text_tokens, cfg.joint_attention_dim), "return_dict": False}
