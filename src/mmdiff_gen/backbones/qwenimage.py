"""Qwen-Image (QwenImagePipeline): every block is a dual-stream (MMDiT) block, text from Qwen2.5-VL."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .base import JointBlocksBackbone, meta
from .runtime import onloaded

# Qwen/Qwen-Image transformer/config.json (the defaults of diffusers 0.42's QwenImageTransformer2DModel): the real
# architecture on the meta device (geometry tests, FLOP counts) without the weights.
QWEN_IMAGE = dict(
    patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56),
)


class QwenImageBackbone(JointBlocksBackbone):
    """QwenImagePipeline adapter.

    Facts it encodes (diffusers 0.42, `transformer_qwenimage.py`, `pipeline_qwenimage.py`):
    - 60 `QwenImageTransformerBlock`s, all dual-stream: each returns (text, image) and updates the text, so
      features and the concept stream both come from `transformer_blocks` (as SD3's);
    - the pipeline passes `timestep = t / 1000`, the sigma itself (the time projection scales by 1000);
    - the prompt goes through a chat template whose first `prompt_template_encode_start_idx` tokens (the system
      prompt) are dropped: the text is the prompt's tokens and the template's closing ones, padded only to the
      batch's longest and masked (`encoder_hidden_states_mask`, which attention honours);
    - RoPE is complex-valued (`QwenEmbedRope`, scale_rope): image positions are centred on the grid, text positions
      start after the image's largest side; `image_rotary_emb` = (image freqs (N, D/2), text freqs (S, D/2));
    - latents: a 16-channel video VAE (`AutoencoderKLQwenImage`, one frame, per-channel mean / std), packed 2×2
      into (B, N, 64) tokens: pixels per token = VAE scale (2^len(temperal_downsample)) × patch 2;
    - true CFG is a second, unconditional call (conditional first) when `true_cfg_scale > 1` with a negative
      prompt (the pipeline's default negative prompt is None: CFG off; ours is "", CFG on as its model card runs
      it); `guidance_scale` is never passed (no released model embeds guidance);
    - the scheduler ends every schedule at `shift_terminal` 0.02 (`backbones.schedule` keeps that last step);
    - float16: diffusers clips both streams to ±65504 after every block, as for FLUX: refused.
    """

    family = "qwenimage"
    FLOAT16_OK = False
    # QwenImagePipeline's steps and true_cfg_scale, with an empty negative prompt so that CFG runs (its model card's).
    SAMPLING_DEFAULTS = {"height": 1024, "width": 1024, "num_inference_steps": 50, "guidance_scale": 1.0,
                         "true_cfg_scale": 4.0, "negative_prompt": None}
    # The text is not padded to max_sequence_length: FLOP counts assume a one-sentence caption's tokens.
    FLOP_TEXT_TOKENS = 64

    def rotate(self, x: torch.Tensor, rotary: Any, part: str) -> torch.Tensor:
        """Complex RoPE as `QwenDoubleStreamAttnProcessor2_0` applies it; concept tokens sit at the first text
        position (a one-token prompt's), not at zero: zero is the centre of the image grid here."""
        from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

        if rotary is None:
            return x
        image, text = rotary  # (N, D/2), (S, D/2) complex
        n = x.shape[1]
        freqs = image[-n:] if part == "image" else text[:n] if part == "text" else text[:1].expand(n, -1)
        return apply_rotary_emb_qwen(x, freqs, use_real=False)

    def sigma_of(self, timestep: torch.Tensor) -> torch.Tensor:
        return timestep

    def timestep_for(self, sigma: float) -> float:
        return sigma

    @staticmethod
    def vae_scale_factor(vae_config: dict) -> int:
        return 2 ** len(vae_config["temperal_downsample"])  # QwenImagePipeline.__init__

    @property
    def pixels_per_token(self) -> int:
        return int(self.pipe.vae_scale_factor) * int(self.transformer.config.patch_size)

    # --- sampling ---------------------------------------------------------------------------
    def pipeline_kwargs(self, sampling: dict) -> dict:
        """No `guidance_scale`: no released Qwen-Image embeds guidance (the pipeline warns and ignores it), and
        diffusers 0.42's guidance path cannot run (`time_text_embed` takes no guidance argument)."""
        return dict(sampling, guidance_scale=None)

    def guidance(self, batch: int, guidance_scale: float) -> None:
        return None  # as `pipeline_kwargs`

    @property
    def max_sequence_length(self) -> int:
        """The pipeline's cap on text tokens (1024): its text is the prompt's own tokens, never padded to this."""
        return int(getattr(self.pipe, "tokenizer_max_length", 1024))

    @property
    def t5_tokenizer(self) -> Any:
        return None  # no T5: `overlong_prompts` counts the templated prompt as the pipeline truncates it

    def overlong_prompts(self, prompts: Sequence[str], max_len: int) -> list[tuple[int, int]]:
        """(prompt index, text tokens) of the prompts the pipeline truncates at `max_len`: the templated prompt's
        tokens after the dropped system prompt, its closing template tokens included, as `encode_prompt` cuts them."""
        texts, drop = self._templated_texts(prompts)
        counts = [len(ids) - drop for ids in self.pipe.tokenizer(texts).input_ids]
        return [(i, n) for i, n in enumerate(counts) if n > max_len]

    # --- text side --------------------------------------------------------------------------
    def _templated_texts(self, prompts: Sequence[str]) -> tuple[list[str], int]:
        pipe = self.pipe
        return [pipe.prompt_template_encode.format(p) for p in prompts], int(pipe.prompt_template_encode_start_idx)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], max_sequence_length: int = 1024) -> dict[str, torch.Tensor]:
        embeds, mask = self.pipe.encode_prompt(prompt=list(prompts), device=self.device,
                                               max_sequence_length=max_sequence_length)
        cond = {"encoder_hidden_states": embeds.to(self.dtype)}
        if mask is not None:  # the pipeline passes None when no prompt of the batch is padded
            cond["encoder_hidden_states_mask"] = mask
        return cond

    def text_token_mask(self, prompts: Sequence[str], max_sequence_length: int = 1024) -> torch.Tensor:
        """(B, S) bool, S the batch's longest templated prompt after the dropped system prompt (at most
        `max_sequence_length`): the mask the pipeline builds (`_get_qwen_prompt_embeds`)."""
        texts, drop = self._templated_texts(prompts)
        enc = self.pipe.tokenizer(texts, max_length=self.max_sequence_length + drop, padding=True, truncation=True,
                                  return_tensors="pt")
        lengths = (enc.attention_mask.sum(dim=1) - drop).clamp(min=0)  # (B,)
        s = min(int(lengths.max()), max_sequence_length)
        return torch.arange(s)[None] < lengths[:, None]

    def grounding_tokenizer(self) -> tuple[Any, int, int]:
        """The Qwen2 tokenizer: the prompt's tokens open the text sequence (the system prompt is dropped)."""
        return self.pipe.tokenizer, 0, self.max_sequence_length

    def _encode_concepts(self, words: tuple[str, ...]) -> torch.Tensor:
        """Each concept encoded alone as the pipeline encodes a prompt (chat template, last hidden layer, system
        prompt dropped); Qwen2.5-VL is causal, so the token kept is the word's last one, then the transformer's text
        input (`txt_norm`, `txt_in`), like the prompt."""
        tok, template = self.pipe.tokenizer, self.pipe.prompt_template_encode
        (_,), drop = self._templated_texts([""])
        head = template[: template.index("{}")]
        firsts = []
        for word in words:
            pos = len(tok(head + word, add_special_tokens=False).input_ids) - 1 - drop  # the word's last token
            embeds, _ = self.pipe._get_qwen_prompt_embeds([word], device=self.device)  # (1, L, D_text)
            firsts.append(embeds[0, pos])
        first = torch.stack(firsts).to(device=self.device, dtype=self.dtype)  # (K, D_text)
        tr = self.transformer
        with onloaded(tr):  # model offload: the embedders run outside the transformer's forward
            return tr.txt_in(tr.txt_norm(first))  # (K, C)

    def concept_temb(self, timestep: torch.Tensor, guidance: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """(B, C) time embedding as `QwenImageTransformer2DModel.forward` computes it (in the compute `dtype`); each
        block's `txt_mod` turns it into the text branch's modulation (`concepts._qwen_block_update`)."""
        t = timestep.to(dtype)
        return self.transformer.time_text_embed(t, t)  # its second argument only gives the dtype

    # --- latents ----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Clean packed latents x0 (B, N, 4·C_vae) from images (B, 3, H, W) in [−1, 1]: one-frame posterior mode,
        normalised by the VAE's per-channel mean and std as the Qwen-Image img2img pipeline does, packed 2×2."""
        vae = self.pipe.vae
        lat = vae.encode(images[:, :, None].to(device=self.device, dtype=vae.dtype)).latent_dist.mode()  # (B, z, 1, h, w)
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(lat)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(lat)
        lat = ((lat - mean) * inv_std)[:, :, 0]  # (B, z, h, w)
        b, c, h, w = lat.shape
        return self.pipe._pack_latents(lat, b, c, h, w).to(self.dtype)

    def position_inputs(self, rows: int, height: int, width: int) -> dict[str, Any]:
        return {"img_shapes": [[(1, *self.token_grid(height, width))]] * rows}  # as QwenImagePipeline passes them

    def meta_inputs(self, rows: int, height: int, width: int, text_tokens: int) -> dict[str, Any]:
        cfg = self.transformer.config
        h, w = self.token_grid(height, width)

        return {"hidden_states": meta(rows, h * w, cfg.in_channels), "timestep": meta(rows),
                "encoder_hidden_states": meta(rows, text_tokens, cfg.joint_attention_dim),
                "img_shapes": [[(1, h, w)]] * rows, "return_dict": False}
