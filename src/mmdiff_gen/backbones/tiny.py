"""Tiny FLUX.1, FLUX.2, Qwen-Image, SD3 and Wan pipelines built from configs: word-level tokenizers, random weights, no downloads.

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


def word_tokenizer(words: Sequence[str], *, model_max_length: int, add_bos: bool, chat: Sequence[str] = ()):
    """A PreTrainedTokenizerFast over a fixed word list (lower-cased, whitespace/punctuation split).

    `chat`: special tokens of a chat template (Qwen's "<|im_start|>", "<|im_end|>"): then newlines are tokens too and
    no EOS is appended, as a Qwen2 tokenizer counts a templated prompt (Qwen-Image drops its first 34 tokens)."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for w in list(chat) + ["\n"] * bool(chat) + list(words):
        vocab.setdefault(w if w in chat else w.lower(), len(vocab))
    tk = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    tk.normalizer = normalizers.Lowercase()
    if chat:  # Whitespace's pattern (words, punctuation runs) plus newlines, kept as tokens
        tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]+|\n"), behavior="removed", invert=True)
        tk.add_special_tokens(list(chat))
    else:
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
    dev: bool = False,
    seed: int = 0,
):
    """A Flux2KleinPipeline ([klein]) or, with `dev`, a Flux2Pipeline ([dev]) with random weights and a tiny
    AutoencoderKLFlux2: [klein] a tiny Qwen3ForCausalLM text encoder, [dev] a tiny Mistral3ForConditionalGeneration (its
    vision tower unused) behind a guidance-embedding transformer.

    The pipelines read text hidden states (9, 18, 27) / (10, 20, 30) by default, so the text encoder keeps 28 / 31
    (narrow) layers and the transformer's text width is 3 × `text_width`. The word-level tokenizer carries a chat
    template that joins the messages' text contents (the pipelines call `apply_chat_template`; [dev]'s messages are
    structured, with its system message first). Geometry: VAE 4× by default, 2×2 patches per token, so a 64×64 image has
    8×8 image tokens. `distilled` sets [klein]'s `is_distilled` (its 4-step models).
    """
    from diffusers import (AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline,
                           Flux2Transformer2DModel)
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    tok = word_tokenizer(words, model_max_length=512, add_bos=False)
    tok.chat_template = ("{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
                         "{% for c in m['content'] %}{{ c['text'] }} {% endfor %}{% endif %}{% endfor %}")
    text = dict(vocab_size=len(tok), hidden_size=text_width, intermediate_size=2 * text_width,
                num_hidden_layers=31 if dev else text_layers, num_attention_heads=2, num_key_value_heads=2,
                head_dim=text_width // 2, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    if dev:
        vision = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, head_dim=8,
                      image_size=32, patch_size=8)
        encoder = Mistral3ForConditionalGeneration(Mistral3Config(
            text_config={"model_type": "mistral", **text}, vision_config={"model_type": "pixtral", **vision},
            spatial_merge_size=1)).eval()
    else:
        encoder = Qwen3ForCausalLM(Qwen3Config(**text, tie_word_embeddings=True)).eval()
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
        timestep_guidance_channels=32, axes_dims_rope=(dim_head - 3 * axis, axis, axis, axis), guidance_embeds=dev,
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, use_dynamic_shifting=True,
        shift=3.0,
    )
    if dev:
        pipe = Flux2Pipeline(scheduler=scheduler, vae=vae, text_encoder=encoder, tokenizer=tok, transformer=transformer)
    else:
        pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=encoder, tokenizer=tok,
                                  transformer=transformer, is_distilled=distilled)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# The words of QwenImagePipeline's prompt template, so that its system prompt is not all unknown tokens.
QWEN_TEMPLATE_WORDS = ("system", "describe", "image", "by", "detailing", "color", "shape", "size", "texture",
                       "quantity", "text", "spatial", "relationships", "objects", "background", "user", "assistant",
                       ",", ":")


def build_tiny_qwenimage(
    *,
    words: Sequence[str] = BASIC_WORDS + CONCEPT_WORDS,
    dim_head: int = 16,
    heads: int = 2,
    blocks: int = 4,
    text_width: int = 32,
    text_layers: int = 2,
    latent_channels: int = 8,
    vae_downsamples: int = 2,
    seed: int = 0,
):
    """A QwenImagePipeline with random weights: a tiny Qwen2.5-VL (its vision tower unused) and AutoencoderKLQwenImage.

    The word-level tokenizer keeps newlines and the template's special tokens, so the pipeline's system prompt is
    exactly the 34 tokens it drops (`prompt_template_encode_start_idx`), as with the real Qwen2 tokenizer. Geometry:
    the VAE downsamples 2^`vae_downsamples` (4× by default; Qwen-Image's 8× is 3), the transformer patches 2×2, so a
    64×64 image has 8×8 image tokens. Complex RoPE axes (t, h, w) sum to the head dim.
    """
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    tok = word_tokenizer(QWEN_TEMPLATE_WORDS + tuple(words), model_max_length=2048, add_bos=False,
                         chat=("<|im_start|>", "<|im_end|>"))
    text = dict(vocab_size=len(tok), hidden_size=text_width, intermediate_size=2 * text_width,
                num_hidden_layers=text_layers, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=text_width,
                  fullatt_block_indexes=[0])
    qwen = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision)).eval()
    vae = AutoencoderKLQwenImage(base_dim=16, z_dim=latent_channels, dim_mult=[1] + [2] * vae_downsamples,
                                 num_res_blocks=1, temperal_downsample=[False] + [True] * (vae_downsamples - 1),
                                 latents_mean=[0.0] * latent_channels,
                                 latents_std=[1.0] * latent_channels).eval()
    axis = dim_head // 4 // 2 * 2  # even RoPE axes (t, h, w) summing to dim_head
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * latent_channels, out_channels=latent_channels, num_layers=blocks,
        attention_head_dim=dim_head, num_attention_heads=heads, joint_attention_dim=text_width,
        axes_dims_rope=(dim_head - 2 * axis, axis, axis),
    ).eval()
    # Qwen/Qwen-Image's scheduler: exponential dynamic shift, every schedule stretched to end at sigma 0.02.
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0, shift_terminal=0.02,
        time_shift_type="exponential", use_dynamic_shifting=True,
    )
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=qwen, tokenizer=tok, transformer=transformer)
    head = pipe.prompt_template_encode[: pipe.prompt_template_encode.index("{}")]
    if len(tok(head).input_ids) != pipe.prompt_template_encode_start_idx:
        raise AssertionError("the tiny tokenizer must count the template's system prompt as QwenImagePipeline drops it")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_wan(
    *,
    words: Sequence[str] = BASIC_WORDS + CONCEPT_WORDS,
    dim_head: int = 12,
    heads: int = 2,
    blocks: int = 4,
    text_width: int = 32,
    text_layers: int = 2,
    latent_channels: int = 8,
    vae_dims: Sequence[int] = (8, 8, 8),
    ffn_mult: int = 2,
    flow_shift: float = 3.0,
    text_ffn: str = "gated-gelu",
    ti2v: bool = False,
    seed: int = 0,
):
    """A WanPipeline (text-to-video) with random weights: a tiny UMT5 encoder (Wan's text encoder) and an
    AutoencoderKLWan that downsamples 4× in space and 4× in time (widths `vae_dims` per level), so a 64×64 clip of
    4k + 1 frames has k + 1 latent frames of 8×8 video tokens (patch (1, 2, 2)). The 3-D RoPE splits the head dim
    into t, h, w parts (Wan: h = w = 2·(dim_head // 6)). The scheduler is Wan 2.1's UniPC with flow sigmas and
    `flow_shift` (3: its 480p setting). `text_ffn`: the encoder's feed-forward (umT5's gated GELU; "relu" is T5's
    plain one, which the toy video backbone takes to start from the image toy's T5). `ti2v`: Wan 2.2 TI2V's kind —
    a residual VAE that patchifies 2×2 before encoding (8× in space here: 16 px per token) and a per-token timestep
    (`expand_timesteps`)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(seed)
    tok = word_tokenizer(words, model_max_length=512, add_bos=False)
    base = vae_dims[0]
    patch = {"is_residual": True, "patch_size": 2, "in_channels": 12, "out_channels": 12} if ti2v else {}
    vae = AutoencoderKLWan(base_dim=base, z_dim=latent_channels, dim_mult=[d // base for d in vae_dims],
                           num_res_blocks=1, temperal_downsample=[True, True], latents_mean=[0.0] * latent_channels,
                           latents_std=[1.0] * latent_channels, scale_factor_temporal=4,
                           scale_factor_spatial=8 if ti2v else 4, **patch).eval()
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=dim_head, in_channels=latent_channels,
        out_channels=latent_channels, text_dim=text_width, freq_dim=32, ffn_dim=ffn_mult * heads * dim_head,
        num_layers=blocks, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=flow_shift)
    pipe = WanPipeline(tokenizer=tok, text_encoder=_t5(tok, text_width, text_layers, umt5=True, ffn=text_ffn), vae=vae,
                       transformer=transformer, scheduler=scheduler, expand_timesteps=ti2v)
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


def _t5(tok, width: int, layers: int, umt5: bool = False, ffn: str | None = None):
    """A T5 encoder; `umt5`: its UMT5 variant (per-layer relative position biases), the class WanPipeline expects;
    `ffn`: the feed-forward kind (default: the config class's, T5 "relu", UMT5 "gated-gelu")."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    model, config = (UMT5EncoderModel, UMT5Config) if umt5 else (T5EncoderModel, T5Config)
    return model(config(
        vocab_size=len(tok), d_model=width, d_kv=width // 2, d_ff=2 * width, num_layers=layers, num_heads=2,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id,
        **({"feed_forward_proj": ffn} if ffn else {}),
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
