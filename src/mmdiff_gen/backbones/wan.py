"""Wan 2.1 / 2.2 text-to-video (WanPipeline): a cross-attention video DiT; tokens are frames' × h' × w'."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .base import Backbone, meta
from .runtime import onloaded
from .schedule import scheduler_sigmas

# transformer/config.json of the released Wan checkpoints (diffusers 0.42's WanTransformer3DModel): the real
# architectures on the meta device (geometry tests, FLOP counts) without the weights. Wan 2.2 TI2V 5B reads 48
# latent channels from its own VAE (16× spatial compression) and takes a per-token timestep.
_WAN = dict(patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WAN_2_1_T2V_1_3B = dict(_WAN, num_attention_heads=12, ffn_dim=8960, num_layers=30)
WAN_2_1_T2V_14B = dict(_WAN, num_attention_heads=40, ffn_dim=13824, num_layers=40)
WAN_2_2_TI2V_5B = dict(_WAN, num_attention_heads=24, ffn_dim=14336, num_layers=30, in_channels=48, out_channels=48)


class WanBackbone(Backbone):
    """WanPipeline adapter (text-to-video).

    Facts it encodes (diffusers 0.42, `transformer_wan.py`, `pipeline_wan.py`):
    - video latents (B, z, f, h, w): `AutoencoderKLWan` compresses 4× in time (f = (frames − 1)/4 + 1: the first
      frame alone, then 4 frames per latent frame) and 8× in space (16× for Wan 2.2 TI2V), normalised per channel;
      the `Conv3d` patch embedding (1, 2, 2) gives tokens laid out frames' × h' × w', row-major;
    - every `WanTransformerBlock` is self-attention over the video tokens (3-D RoPE) → cross-attention (`attn2`) to
      the umT5 text → FFN, and returns only the video tokens (B, N, C): the text is never updated, so there is no
      joint attention and no concept stream. Concept maps are read in the cross-attention instead (`_hooks`): each
      concept word's key through the block's own `attn2.to_k` / `norm_k`, the video queries attending over the
      concept keys alone, softmax over concepts, mean over heads. The block's output is never touched;
    - q / k norms are RMSNorms across heads (applied before the heads are split), cross-attention has no RoPE and no
      mask: the prompt is padded with zeros to 512 umT5 positions, all of which the video attends to;
    - the scheduler is `UniPCMultistepScheduler` (flow prediction, flow sigmas, static `flow_shift`) and the
      pipeline calls `set_timesteps(num_inference_steps)` with no `sigmas=`: the contract's sigmas reach it through
      `run_pipeline`. UniPC casts its timesteps to int64, so the transformer receives floor(σ·1000): the
      contract places its targets so that floor is exact, and real-video mode passes round(σ·1000);
    - classifier-free guidance (`guidance_scale` > 1, Wan's default 5) is a second, unconditional call after the
      conditional one; the negative prompt defaults to "";
    - Wan 2.2 TI2V 5B (`expand_timesteps`): the pipeline hands the transformer one float timestep per video token
      (B, N), all equal in text-to-video (the mask that would zero a conditioning frame's is all ones); a row's sigma
      is read from its largest (`sigma_of`), and real-video mode passes the same per-token layout. Its VAE
      patchifies 2×2 before its 8× encoder (16× in all), so a token covers 32 px (`pixels_per_token`);
    - Wan 2.2 A14B's second transformer (`transformer_2`, low-noise steps) is refused in one line: capture's hooks
      hold one transformer.
    """

    family = "wan"
    VIDEO = True
    CROSS_ATTENTION = True
    CONCEPT_EMBEDDERS: tuple[str, ...] = ()  # no concept stream: concept keys come from each block's `attn2`
    # WanPipeline's own defaults (480p, 81 frames, 50 steps, CFG 5).
    SAMPLING_DEFAULTS = {"height": 480, "width": 832, "num_frames": 81, "num_inference_steps": 50,
                         "guidance_scale": 5.0, "true_cfg_scale": 1.0, "negative_prompt": None}

    def __init__(self, pipe: Any, name: str, settings: dict | None = None, weights_id: str = ""):
        if getattr(pipe, "transformer_2", None) is not None:
            raise ValueError("Wan 2.2 with a second (low-noise) transformer is not supported: capture holds one "
                             "transformer; use Wan 2.1 or Wan 2.2 TI2V")
        super().__init__(pipe, name, settings, weights_id)

    @property
    def per_token_timestep(self) -> bool:
        """Wan 2.2 TI2V: one timestep per video token (WanPipeline's `expand_timesteps`)."""
        return bool(getattr(getattr(self.pipe, "config", None), "expand_timesteps", False))

    # --- the transformer --------------------------------------------------------------------
    @property
    def feature_blocks(self) -> nn.ModuleList:
        return self.transformer.blocks

    @property
    def joint_blocks(self) -> nn.ModuleList:
        return self.transformer.blocks  # every block cross-attends to the text

    def block_attention(self, block: nn.Module) -> nn.Module:
        return block.attn2  # the text-reading attention; `attn1` is video self-attention

    def image_tokens(self, block_output: Any) -> torch.Tensor:
        return block_output  # (B, N, C), N = f'·h'·w'

    def rotate(self, x: torch.Tensor, rotary: Any, part: str) -> torch.Tensor:
        return x  # cross-attention: no RoPE

    @property
    def _train_steps(self) -> int:
        return int(getattr(getattr(self.pipe, "scheduler", None), "config", {}).get("num_train_timesteps", 1000))

    def sigma_of(self, timestep: torch.Tensor) -> torch.Tensor:
        """Per-row sigmas (B,) from a timestep (B,), or TI2V's per-token (B, N) (its largest: a conditioning
        frame's tokens, in image-to-video, carry 0)."""
        if timestep.ndim == 2:
            timestep = timestep.amax(1)
        return timestep.float() / self._train_steps

    def timestep_for(self, sigma: float) -> float:
        return float(round(sigma * self._train_steps))

    def timestep_input(self, sigma: torch.Tensor) -> torch.Tensor:
        """int64 round(σ·1000), as UniPC hands the pipeline its (integer) timesteps."""
        return (sigma.double() * self._train_steps).round().long().to(self.device)

    def transformer_inputs(self, latents: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor],
                           guidance_scale: float, height: int, width: int) -> dict[str, Any]:
        out = super().transformer_inputs(latents, sigma, cond, guidance_scale, height, width)
        if self.per_token_timestep:  # (B, N) float32, as WanPipeline builds it (a float mask times the timestep)
            tokens = math.prod(latents.shape[2:]) // math.prod(self.transformer.config.patch_size)
            out["timestep"] = out["timestep"].float()[:, None].expand(-1, tokens)
        return out

    # --- geometry ---------------------------------------------------------------------------
    @staticmethod
    def vae_scale_factor(vae_config: dict) -> int:
        return int(vae_config.get("scale_factor_spatial", 8))  # WanPipeline.__init__

    @property
    def frames_per_latent(self) -> int:
        """Video frames per latent frame after the first (the VAE's temporal compression)."""
        return int(getattr(self.pipe, "vae_scale_factor_temporal", 4))

    @property
    def pixels_per_token(self) -> int:
        spatial = getattr(self.pipe, "vae_scale_factor_spatial", None) or self.pipe.vae_scale_factor
        return int(spatial) * int(self.transformer.config.patch_size[1])

    @property
    def size_range(self) -> tuple[int, int]:
        return 2 * self.pixels_per_token, 2 * 1280  # 720p's long side, doubled (as the image families allow)

    def latent_frames(self, frames: int) -> int:
        """Latent frames of a clip of `frames` frames; frames − 1 must be a multiple of the VAE's temporal factor."""
        k = self.frames_per_latent
        if frames < 1 or (frames - 1) % k:
            raise ValueError(f"a clip's frame count must be {k}·n + 1 (the VAE keeps the first frame alone, then "
                             f"compresses {k} frames into one), got {frames}")
        return (frames - 1) // k + 1

    def token_grid(self, height: int, width: int, frames: int | None = None) -> tuple[int, ...]:
        """(f', h', w') video tokens of a clip; without `frames`, one frame's (h', w')."""
        h, w = super().token_grid(height, width)
        if frames is None:
            return h, w
        return self.latent_frames(frames) // int(self.transformer.config.patch_size[0]), h, w

    def schedule_mu(self, image_seq_len: int, num_inference_steps: int | None = None) -> None:
        return None  # a static flow_shift

    # --- sampling ---------------------------------------------------------------------------
    def pipeline_kwargs(self, sampling: dict) -> dict:
        """WanPipeline takes no `sigmas=` (`run_pipeline` hands them to its scheduler) and no true CFG."""
        out = dict(sampling)
        out.pop("sigmas", None)
        out.pop("true_cfg_scale", None)
        return out

    def run_pipeline(self, **kwargs) -> Any:
        """WanPipeline's frames (per clip), its scheduler following `sigmas` where given."""
        with self._planned_sigmas(kwargs.pop("sigmas", None)):
            return self.pipe(**self.pipeline_kwargs(kwargs)).frames

    @contextmanager
    def _planned_sigmas(self, sigmas: Sequence[float] | None) -> Iterator[None]:
        """Within: the pipeline's `scheduler.set_timesteps(N, device)` follows `sigmas` (the contract's pre-shift
        inputs), as a pipeline taking `sigmas=` would pass them."""
        if sigmas is None:
            yield
            return
        scheduler = self.pipe.scheduler
        own = scheduler.set_timesteps

        def set_timesteps(num_inference_steps=None, device=None, **kw):
            return own(device=device, sigmas=scheduler_sigmas(scheduler, sigmas), **kw)

        scheduler.set_timesteps = set_timesteps
        try:
            yield
        finally:
            del scheduler.set_timesteps  # the class's method again

    @property
    def max_sequence_length(self) -> int:
        return 512  # WanPipeline's default; umT5 positions the cross-attention always sees

    @property
    def t5_tokenizer(self) -> Any:
        return self.pipe.tokenizer

    # --- text side --------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], max_sequence_length: int = 512) -> dict[str, torch.Tensor]:
        embeds = self.pipe._get_t5_prompt_embeds(prompt=list(prompts), max_sequence_length=max_sequence_length,
                                                 device=self.device)
        return {"encoder_hidden_states": embeds.to(self.dtype)}

    def text_token_mask(self, prompts: Sequence[str], max_sequence_length: int = 512) -> torch.Tensor:
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        enc = self.pipe.tokenizer([prompt_clean(p) for p in prompts], padding="max_length",
                                  max_length=max_sequence_length, truncation=True, return_tensors="pt")
        return enc.attention_mask.bool()

    def _encode_concepts(self, words: tuple[str, ...]) -> torch.Tensor:
        """Each word encoded alone by umT5 as the pipeline encodes a prompt, its first token kept (the encoder is
        bidirectional: token 0 has read the whole word, ConceptAttention's T5 recipe), through the transformer's text
        input (`condition_embedder.text_embedder`), like the prompt: (K, C), what `attn2.to_k` reads."""
        embeds = self.pipe._get_t5_prompt_embeds(prompt=list(words), max_sequence_length=8, device=self.device)
        first = embeds[:, 0].to(self.dtype)  # (K, D_text)
        tr = self.transformer
        with onloaded(tr):  # model offload: the embedder runs outside the transformer's forward
            return tr.condition_embedder.text_embedder(first)  # (K, C)

    def concept_temb(self, timestep: torch.Tensor, guidance: torch.Tensor | None, dtype: torch.dtype) -> None:
        return None  # no concept stream, no modulation

    def grounding_tokenizer(self) -> tuple[Any, int, int]:
        return self.pipe.tokenizer, 0, self.max_sequence_length

    # --- latents ----------------------------------------------------------------------------
    def preprocess(self, images: Any) -> torch.Tensor:
        """(B, 3, F, H, W) in [−1, 1] from clips: a list of frame lists (PIL) or a (B, F, 3, H, W) tensor in [0, 1]."""
        if isinstance(images, torch.Tensor):
            return images.permute(0, 2, 1, 3, 4) * 2 - 1
        return torch.cat([self.pipe.video_processor.preprocess_video(list(clip)) for clip in images])

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Clean latents x0 (B, z, f, h, w) from clips (B, 3, F, H, W) in [−1, 1]: the posterior mode, normalised by
        the VAE's per-channel mean and std (the inverse of WanPipeline's decode)."""
        vae = self.pipe.vae
        lat = vae.encode(images.to(device=self.device, dtype=vae.dtype)).latent_dist.mode()
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(lat)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(lat)
        return ((lat - mean) * inv_std).to(self.dtype)

    def meta_inputs(self, rows: int, height: int, width: int, text_tokens: int,
                    frames: int | None = None) -> dict[str, Any]:
        cfg = self.transformer.config
        f, h, w = self.token_grid(height, width, frames or self.SAMPLING_DEFAULTS["num_frames"])
        p_t, p_h, p_w = cfg.patch_size
        return {"hidden_states": meta(rows, cfg.in_channels, f * p_t, h * p_h, w * p_w), "timestep": meta(rows),
                "encoder_hidden_states": meta(rows, text_tokens, cfg.text_dim), "return_dict": False}

