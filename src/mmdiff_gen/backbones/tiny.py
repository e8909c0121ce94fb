"""Tiny FLUX- and SD3-architecture pipelines built from configs: word-level tokenizers, random weights, no downloads.

Used by the tests and benchmarks, and as the skeleton the toy backbone is trained from. The
pitfalls each choice avoids are in the comments.
"""

from __future__ import annotations

from typing import Sequence

import torch

# Special tokens. CLIP must see an explicit EOS (else it pools position 0) and eos id 2 takes a
# legacy code path in transformers' CLIP, so the ids here avoid it.
PAD, EOS, UNK, BOS = "<pad>", "</s>", "<unk>", "<s>"
SPECIALS = (PAD, EOS, UNK, BOS)

CONCEPT_WORDS = ("object", "background", "detail", "edges", "salient", "contour", "depth", "surface", "near", "far")
BASIC_WORDS = ("a", "an", "the", "and", "on", "in", "of", "with", "left", "right", "center", "small", "large",
               "red", "green", "blue", "yellow", "purple", "orange", "white", "black",
               "circle", "square", "triangle", "star", "ring", "cross", "photo", "cat", "dog", "car", "tree")


def word_tokenizer(words: Sequence[str], *, model_max_length: int, add_bos: bool):
    """A PreTrainedTokenizerFast over a fixed word list (lower-cased, whitespace/punctuation split)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for w in words:
        vocab.setdefault(w.lower(), len(vocab))
    tk = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    single = f"{BOS} $A {EOS}" if add_bos else f"$A {EOS}"
    tk.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        model_max_length=model_max_length,  # without it FluxPipeline overflows
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        bos_token=BOS,
    )


def build_tiny_flux(
    *,
    words: Sequence[str] = BASIC_WORDS + CONCEPT_WORDS,
    dim_head: int = 16,
    heads: int = 2,
    double_blocks: int = 2,
    single_blocks: int = 4,
    text_width: int = 32,
    text_layers: int = 2,
    vae_channels: Sequence[int] = (16, 32, 32),
    latent_channels: int = 16,
    guidance_embeds: bool = True,
    t5_max_length: int = 32,
    seed: int = 0,
):
    """A FluxPipeline with random weights, small enough to run a 64×64 generation in well under a second.

    Geometry: the VAE downsamples by 2^(len(vae_channels) − 1) (4 by default), FLUX packs 2×2 latents
    per token, so a 64×64 image has 8×8 = 64 image tokens. RoPE axes sum to the head dim.
    """
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )

    torch.manual_seed(seed)
    clip_tok = word_tokenizer(words, model_max_length=77, add_bos=True)
    t5_tok = word_tokenizer(words, model_max_length=t5_max_length, add_bos=False)
    clip = _clip(clip_tok, text_width, text_layers, with_projection=False)
    t5 = _t5(t5_tok, text_width, text_layers)
    vae = _vae(vae_channels, latent_channels)
    axis = dim_head // 4 // 2 * 2  # even sizes summing to dim_head
    rope = (dim_head - 2 * axis, axis, axis)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=double_blocks, num_single_layers=single_blocks,
        attention_head_dim=dim_head, num_attention_heads=heads, joint_attention_dim=text_width,
        pooled_projection_dim=text_width, guidance_embeds=guidance_embeds, axes_dims_rope=rope,
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, use_dynamic_shifting=True,
        shift=3.0,
    )
    pipe = FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5, tokenizer_2=t5_tok,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_flux2(
    *,
    words: Sequence[str] = BASIC_WORDS + CONCEPT_WORDS,
    dim_head: int = 16,
    heads: int = 2,
    double_blocks: int = 2,
    single_blocks: int = 4,
    text_width: int = 16,
    text_layers: int = 28,
    vae_channels: Sequence[int] = (16, 32, 32),
    latent_channels: int = 8,
    distilled: bool = True,
    seed: int = 0,
):
    """A Flux2KleinPipeline with random weights: a tiny Qwen3ForCausalLM text encoder and a tiny AutoencoderKLFlux2.

    The pipeline reads Qwen3 hidden states (9, 18, 27) by default, so the text encoder keeps 28 (narrow) layers and
    the transformer's text width is 3 × `text_width`. The word-level tokenizer carries a chat template that joins the
    messages' contents (the pipeline calls `apply_chat_template`). Geometry: VAE 4× by default, 2×2 patches per token,
    so a 64×64 image has 8×8 image tokens. `distilled` sets the pipeline's `is_distilled` ([klein]'s 4-step models).
    """
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    tok = word_tokenizer(words, model_max_length=512, add_bos=False)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    qwen = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tok), hidden_size=text_width, intermediate_size=2 * text_width, num_hidden_layers=text_layers,
        num_attention_heads=2, num_key_value_heads=2, head_dim=text_width // 2, max_position_embeddings=512,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True,
    )).eval()
    n = len(vae_channels)
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(vae_channels), layers_per_block=1, latent_channels=latent_channels,
        norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False,
    ).eval()
    axis = dim_head // 4 // 2 * 2  # four even RoPE axes (t, h, w, l) summing to dim_head
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=double_blocks, num_single_layers=single_blocks,
        attention_head_dim=dim_head, num_attention_heads=heads, joint_attention_dim=3 * text_width,
        timestep_guidance_channels=32, axes_dims_rope=(dim_head - 3 * axis, axis, axis, axis), guidance_embeds=False,
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, use_dynamic_shifting=True,
        shift=3.0,
    )
    pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=qwen, tokenizer=tok, transformer=transformer,
                              is_distilled=distilled)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_sd3(
    *,
    words: Sequence[str] = BASIC_WORDS + CONCEPT_WORDS,
    dim_head: int = 16,
    heads: int = 2,
    blocks: int = 4,
    clip_width: int = 16,
    t5_width: int = 32,
    vae_channels: Sequence[int] = (16, 32, 32),
    qk_norm: str | None = None,
    dual_attention_layers: tuple[int, ...] = (),
    t5_max_length: int = 32,
    seed: int = 0,
):
    """A StableDiffusion3Pipeline with random weights (two CLIPs with projection + T5, like SD3).

    Geometry: VAE 4× by default, transformer patch 2, so a 64×64 image has 8×8 image tokens.
    `qk_norm="rms_norm"` and `dual_attention_layers` give the SD3.5 variants. The two CLIP widths
    add up to at most the T5 width: the pipeline pads CLIP embeddings to the T5 width and silently
    crops them when they are wider.
    """
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    if 2 * clip_width > t5_width:
        raise ValueError(f"two CLIPs of width {clip_width} exceed the T5 width {t5_width}: SD3 would crop them")
    torch.manual_seed(seed)
    clip_tok = word_tokenizer(words, model_max_length=77, add_bos=True)
    t5_tok = word_tokenizer(words, model_max_length=t5_max_length, add_bos=False)
    inner = heads * dim_head
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, num_layers=blocks, attention_head_dim=dim_head,
        num_attention_heads=heads, joint_attention_dim=t5_width, caption_projection_dim=inner,
        pooled_projection_dim=2 * clip_width, out_channels=16, pos_embed_max_size=32, qk_norm=qk_norm,
        dual_attention_layers=tuple(dual_attention_layers),
    ).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(vae_channels, 16),
        text_encoder=_clip(clip_tok, clip_width, 2, with_projection=True), tokenizer=clip_tok,
        text_encoder_2=_clip(clip_tok, clip_width, 2, with_projection=True), tokenizer_2=clip_tok,
        text_encoder_3=_t5(t5_tok, t5_width, 2), tokenizer_3=t5_tok,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _clip(tok, width: int, layers: int, *, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=width,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )).eval()


def _t5(tok, width: int, layers: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=len(tok), d_model=width, d_kv=width // 2, d_ff=2 * width, num_layers=layers, num_heads=2,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id,
    )).eval()


def _vae(channels: Sequence[int], latent_channels: int):
    """A 16-channel AutoencoderKL downsampling by 2^(len(channels) − 1)."""
    from diffusers import AutoencoderKL

    n = len(channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(channels), layers_per_block=1, latent_channels=latent_channels,
        norm_num_groups=8,  # must divide every block width
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0, scaling_factor=1.0,
    ).eval()
