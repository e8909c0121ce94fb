"""FLUX.2 (Flux2Pipeline [dev], Flux2KleinPipeline [klein]): features from single-stream blocks, the concept stream
through the double-stream ones."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from .base import Backbone, meta
from .runtime import onloaded

# black-forest-labs/FLUX.2-dev transformer/config.json (the defaults of diffusers 0.42's Flux2Transformer2DModel):
# the real architecture on the meta device (geometry tests, FLOP counts) without the weights.
FLUX2_DEV = dict(
    patch_size=1, in_channels=128, num_layers=8, num_single_layers=48, attention_head_dim=128, num_attention_heads=48,
    joint_attention_dim=15360, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=True,
)


class Flux2Backbone(Backbone):
    """Flux2Pipeline / Flux2KleinPipeline adapter.

    Facts it encodes (diffusers 0.42, `transformer_flux2.py`, `pipeline_flux2*.py`):
    - double-stream blocks (`transformer_blocks`) return (text, image); single-stream blocks return the
      concatenated [text; image] tokens (one tensor), so their image tokens are the last N after the call's
      S text tokens;
    - the pipelines pass `timestep = t / 1000`, the sigma itself; the transformer multiplies by 1000;
    - latents are the VAE's (B, C, h, w) patchified 2×2 and batch-norm-normalised, packed row-major into
      (B, N, 4·C) tokens: pixels per token = VAE scale factor × 2 × patch size;
    - the scheduler shift is `compute_empirical_mu(image tokens, steps)` (it depends on the step count);
    - [dev] is guidance-distilled (the guidance embedding gets `guidance_scale`); [klein] passes no guidance and
      runs true CFG as a second, unconditional call when `guidance_scale > 1` on a non-distilled model
      (`is_distilled`: the 4-step models, guidance ignored);
    - modulation is computed once per call from the time embedding by the transformer
      (`double_stream_modulation_txt`) and passed to every block, whose text branch has plain LayerNorms: the
      concept stream takes that modulation (`concept_temb`) into `capture.concepts._flux2_block_update`.
    """

    family = "flux2"
    # diffusers clips both block kinds' outputs to ±65504 in float16, as for FLUX.1: the activations overflow.
    FLOAT16_OK = False

    def __init__(self, pipe: Any, name: str, settings: dict | None = None, weights_id: str = ""):
        super().__init__(pipe, name=name, settings=settings, weights_id=weights_id)
        self._text_tokens = 0  # S of the transformer call under way (single-stream outputs are [text; image])
        self._text_hook = self.transformer.register_forward_pre_hook(self._note_text_tokens, with_kwargs=True)

    def _note_text_tokens(self, _module, _args, kwargs):
        enc = kwargs.get("encoder_hidden_states")
        if enc is not None:
            self._text_tokens = enc.shape[1]

    @property
    def klein(self) -> bool:
        return type(self.pipe).__name__.startswith("Flux2Klein")

    @property
    def distilled(self) -> bool:
        config = getattr(self.pipe, "config", None) or {}
        return bool(config.get("is_distilled", False))

    @property
    def feature_blocks(self) -> nn.ModuleList:
        return self.transformer.single_transformer_blocks

    @property
    def joint_blocks(self) -> nn.ModuleList:
        return self.transformer.transformer_blocks

    @property
    def attention_blocks(self) -> list[nn.Module]:
        """The double-stream blocks only: single-stream blocks fuse q, k, v and the MLP in one projection
        (`to_qkv_mlp_proj`), which capture's text-attention hooks do not read."""
        return list(self.joint_blocks)

    def image_tokens(self, block_output: Any) -> torch.Tensor:
        if isinstance(block_output, tuple):
            return block_output[1]  # double-stream: (text, image) → image, (B, N, C)
        return block_output[:, self._text_tokens:]  # single-stream: [text; image] → image, (B, N, C)

    def sigma_of(self, timestep: torch.Tensor) -> torch.Tensor:
        return timestep

    def timestep_for(self, sigma: float) -> float:
        return sigma

    @property
    def pixels_per_token(self) -> int:
        # The pipelines patchify 2×2 latent pixels into one token; transformer patch_size is 1.
        return int(self.pipe.vae_scale_factor) * 2 * int(self.transformer.config.patch_size)

    # --- sampling ---------------------------------------------------------------------------
    @property
    def SAMPLING_DEFAULTS(self) -> dict:  # noqa: N802 (the base class's attribute name)
        """[klein] distilled: 4 steps, guidance 1 (ignored by the pipeline); [klein] base and [dev]: the pipelines'
        own defaults, 50 steps at guidance 4 (CFG for [klein] base, the guidance embedding for [dev])."""
        steps, guidance = (4, 1.0) if self.klein and self.distilled else (50, 4.0)
        return {"height": 1024, "width": 1024, "num_inference_steps": steps, "guidance_scale": guidance,
                "true_cfg_scale": 1.0, "negative_prompt": None}

    def schedule_mu(self, image_seq_len: int, num_inference_steps: int | None = None) -> float | None:
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        if not self.pipe.scheduler.config.get("use_dynamic_shifting"):
            return None
        if num_inference_steps is None:
            raise ValueError("FLUX.2's schedule shift depends on the step count: pass num_inference_steps")
        return compute_empirical_mu(image_seq_len=image_seq_len, num_steps=int(num_inference_steps))

    @property
    def default_sigmas(self) -> tuple[float, ...] | None:
        """The capture sigmas this backbone is meant to be read at. The distilled [klein] samples 4 steps whose shifted
        sigmas stay above ≈ 0.77 at 512² and ≈ 0.89 at 1024² (compute_empirical_mu grows with the token count), so
        of the paper's (0.78, 0.52, 0.26, 0.001) three or four would be extra forwards: its default is (0.001,), the
        one extra forward on the final latents. None (the others): CaptureSpec's default, the paper's."""
        return (0.001,) if self.klein and self.distilled else None

    def check_schedule(self, schedule: Any) -> None:
        """The distilled [klein] runs 4 forwards: capture may add one more, never several."""
        if self.klein and self.distilled and len(schedule.extra) > 1:
            raise ValueError(f"FLUX.2 [klein] (4-step distilled) never samples below sigma {schedule.default_sigmas[-1]:.3f}: "
                             f"capturing at {schedule.extra} would add {len(schedule.extra)} forwards to its 4; capture "
                             f"at {self.default_sigmas} (one extra forward) or at sigmas its schedule visits")

    def pipeline_kwargs(self, sampling: dict) -> dict:
        """FLUX.2 pipelines take no negative prompt and no `true_cfg_scale` ([klein]'s CFG is `guidance_scale`)."""
        out = dict(sampling)
        if float(out.pop("true_cfg_scale", 1.0) or 1.0) > 1:
            raise ValueError("FLUX.2 has no true_cfg_scale: [klein] base runs CFG from guidance_scale, [dev] and the "
                             "distilled [klein] have none")
        out.pop("negative_prompt", None)
        return out

    # --- text side --------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], max_sequence_length: int = 512) -> dict[str, torch.Tensor]:
        embeds, text_ids = self.pipe.encode_prompt(prompt=list(prompts), device=self.device,
                                                   max_sequence_length=max_sequence_length)
        return {"encoder_hidden_states": embeds.to(self.dtype), "txt_ids": text_ids}

    # What the pipelines tokenize: [klein] each prompt through its Qwen3 chat template, tokenized alone (padded to
    # max_sequence_length); [dev] the system message and the prompt through its Mistral-3 processor's chat template
    # (structured messages: `format_input`), tokenized by the template (no special tokens added on top).
    def _templated(self, prompt: str) -> str:
        tok = self.pipe.tokenizer
        if self.klein:
            return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True, enable_thinking=False)
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input

        return tok.apply_chat_template(format_input([prompt], self.pipe.system_message)[0], tokenize=False,
                                       add_generation_prompt=False)

    def _prompt_start(self) -> str:
        """The templated text before a prompt's first character (its opening, [dev]'s system message): found with a
        placeholder, never by searching for the prompt, which the template's closing tokens may contain ("star" in
        `<|im_start|>`)."""
        mark = "\ue000"  # a private-use character no template holds
        return self._templated(mark).split(mark)[0]

    @property
    def _text_tokenizer(self) -> Any:
        tok = self.pipe.tokenizer
        return getattr(tok, "tokenizer", tok)  # [dev]: the processor's own tokenizer

    def _tokenize(self, texts: list[str], **kw) -> Any:
        return self._text_tokenizer(texts, add_special_tokens=self.klein, **kw)

    def text_token_mask(self, prompts: Sequence[str], max_sequence_length: int = 512) -> torch.Tensor:
        """(B, S) bool: which positions of the templated text input hold tokens rather than padding."""
        enc = self._tokenize([self._templated(p) for p in prompts], padding="max_length", truncation=True,
                             max_length=max_sequence_length, return_tensors="pt")
        return enc.attention_mask.bool()

    @property
    def t5_tokenizer(self) -> Any:
        return None  # FLUX.2 has no T5: text length is the pipelines' 512

    def grounding_tokenizer(self) -> tuple[Any, int, int]:
        """The text tokenizer and where a prompt's own tokens start in the templated sequence (after the template's
        opening, [dev]'s system message), less the special tokens the tokenizer puts before a prompt alone."""
        inner = self._text_tokenizer
        if getattr(inner, "padding_side", "right") == "left":  # the prompt's place would depend on its length
            raise ValueError("FLUX.2 openseg: this text tokenizer pads on the left, so a prompt's tokens move with "
                             "its length; set tokenizer.padding_side = 'right' (the pipeline's masks follow it)")
        before = len(inner(self._prompt_start(), add_special_tokens=False).input_ids)
        alone, bare = inner("x").input_ids, inner("x", add_special_tokens=False).input_ids
        return inner, before - alone.index(bare[0]), self.max_sequence_length

    def _encode_concepts(self, words: tuple[str, ...]) -> torch.Tensor:
        """Each concept encoded alone as the pipeline encodes a prompt (chat template, the same hidden layers); the
        text encoder is causal, so the token kept is the word's last one (it has read the whole word, where FLUX.1
        keeps T5's token 0), then the transformer's context embedder, like the prompt."""
        pipe, firsts, start = self.pipe, [], self._prompt_start()
        for word in words:
            text = self._templated(word)
            pos = len(self._text_tokenizer(start + word, add_special_tokens=False).input_ids) - 1  # the word's last token
            length = len(self._tokenize([text]).input_ids[0])  # the whole templated word, unpadded
            if self.klein:
                embeds = pipe._get_qwen3_prompt_embeds(pipe.text_encoder, pipe.tokenizer, [word], device=self.device,
                                                       max_sequence_length=length)  # (1, length, 3·D)
            else:
                embeds = pipe._get_mistral_3_small_prompt_embeds(pipe.text_encoder, pipe.tokenizer, [word],
                                                                 device=self.device, max_sequence_length=length,
                                                                 system_message=pipe.system_message)
            firsts.append(embeds[0, pos])
        first = torch.stack(firsts).to(device=self.device, dtype=self.dtype)  # (K, 3·D)
        with onloaded(self.transformer):  # model offload: the embedder runs outside the transformer's forward
            return self.transformer.context_embedder(first)  # (K, C)

    CONCEPT_EMBEDDERS = ("time_guidance_embed", "double_stream_modulation_txt")

    def concept_temb(self, timestep: torch.Tensor, guidance: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """(B, 6C) text-branch modulation of the double-stream blocks at this call's timestep (and guidance), as
        Flux2Transformer2DModel.forward computes it once for all of them, in the compute `dtype`."""
        tr = self.transformer
        t = timestep.to(dtype) * 1000
        g = None if guidance is None else guidance.to(dtype) * 1000
        return tr.double_stream_modulation_txt(tr.time_guidance_embed(t, g))

    # --- latents ----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Clean packed latents x0 (B, N, 4·C_vae) from images (B, 3, H, W) in [−1, 1]: the pipeline's own
        encoding of condition images (posterior mode, 2×2 patchify, batch-norm statistics), then packing."""
        vae = self.pipe.vae
        lat = self.pipe._encode_vae_image(images.to(device=self.device, dtype=vae.dtype), generator=None)
        return self.pipe._pack_latents(lat).to(self.dtype)  # (B, h·w, 4·C_vae), row-major as the image ids

    def image_ids(self, height: int, width: int) -> torch.Tensor:
        """(1, N, 4) RoPE position ids (t, h, w, l) of the image tokens at this size."""
        h, w = self.token_grid(height, width)
        return self.pipe._prepare_latent_ids(torch.empty(1, 1, h, w)).to(self.device)

    def guidance(self, batch: int, guidance_scale: float) -> torch.Tensor | None:
        """[dev]'s guidance embedding input; [klein] passes none (pipeline_flux2_klein: `guidance=None`)."""
        return None if self.klein else super().guidance(batch, guidance_scale)

    def position_inputs(self, rows: int, height: int, width: int) -> dict[str, Any]:
        return {"img_ids": self.image_ids(height, width)}

    def meta_inputs(self, rows: int, height: int, width: int, text_tokens: int) -> dict[str, Any]:
        cfg = self.transformer.config
        n = math.prod(self.token_grid(height, width))  # packed image tokens

        return {"hidden_states": meta(rows, n, cfg.in_channels), "timestep": meta(rows),
                "guidance": meta(rows) if cfg.guidance_embeds and not self.klein else None,
                "encoder_hidden_states": meta(rows, text_tokens, cfg.joint_attention_dim),
                "txt_ids": meta(text_tokens, 4), "img_ids": meta(n, 4), "return_dict": False}
