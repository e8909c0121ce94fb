"""Concept attention (MMDiff §3.2, after ConceptAttention) and the averaged cross-attention baseline.

A separate stream of concept tokens runs through the joint blocks (FLUX double-stream blocks, SD3
JointTransformerBlocks, Qwen-Image's dual-stream blocks) with the text stream's weights. Concept queries attend to [concept keys;
image keys]; image and text queries never see concept keys, so generation is untouched. The stock
block runs unchanged: capture's hooks (`_hooks.py`) keep the image projections and attention output it
computes, and the concept update below reuses them. The families' attention modules share these projection names;
SD3-medium has no q/k norms (None) and its last block is `context_pre_only` (no text output); what differs is the text
branch's modulation (one function per family below).

A cross-attention DiT (Wan) updates no text, so no stream can run: its concept maps come from the image queries of
each cross-attention against the concept words' keys (`concept_query_map`, called by `_hooks`).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .text_attention import _heads, _norm, text_attention


def concept_block_update(
    block: nn.Module,
    concepts: torch.Tensor,
    temb: torch.Tensor,
    image_keys: torch.Tensor,
    image_values: torch.Tensor,
    rotate: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One joint block applied to the concept stream.

    Mirrors the text branch of diffusers 0.42 `FluxTransformerBlock.forward` and
    `JointTransformerBlock.forward` (AdaLN-Zero with `norm1_context`, `add_*_proj`, `norm_added_*`,
    `to_add_out`, gated residuals, `ff_context`). A `context_pre_only` block (SD3's last) only
    normalises its text with `norm1_context(x, temb)` and has no text output: the concept attention
    output is still computed (it gives the map), and the stream ends unchanged.

    Args:
        block: a FluxTransformerBlock or JointTransformerBlock.
        concepts: (B, K, C) concept stream entering the block.
        temb: (B, C) concept modulation (time (+ guidance) embedding, zero pooled text).
        image_keys: (B, N, H, D) image keys after `norm_k` (and RoPE for FLUX), as the block computed them.
        image_values: (B, N, H, D) image values.
        rotate: RoPE of the concept queries and keys (B, K, H, D) (`Backbone.rotate(..., "concept")`); None: none.

    Returns:
        (concepts after the block (B, K, C), concept attention output before `to_add_out` (B, K, H·D)).
    """
    attn = block.attn
    if hasattr(block, "txt_mod"):  # Qwen-Image: each block modulates its text from the shared time embedding
        return _qwen_block_update(block, concepts, temb, image_keys, image_values, rotate)
    if isinstance(block.norm1_context, nn.LayerNorm):  # FLUX.2: modulation (B, 6C) from the transformer
        return _flux2_block_update(block, concepts, temb, image_keys, image_values, rotate)
    last = getattr(block, "context_pre_only", False)
    if last:
        normed = block.norm1_context(concepts, temb)
    else:
        normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1_context(concepts, emb=temb)
    out = _concept_attention(attn, normed, image_keys, image_values, rotate)  # (B, K, H·D)
    if last:
        return concepts, out

    concepts = concepts + gate_msa.unsqueeze(1) * attn.to_add_out(out)
    normed = block.norm2_context(concepts) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    concepts = concepts + gate_mlp.unsqueeze(1) * block.ff_context(normed)
    if concepts.dtype == torch.float16:
        concepts = concepts.clip(-65504, 65504)
    return concepts, out


def _concept_attention(attn: nn.Module, normed: torch.Tensor, image_keys: torch.Tensor,
                       image_values: torch.Tensor, rotate: Callable | None = None) -> torch.Tensor:
    """Normed concepts (B, K, C) attending over [concepts; image] with the block's text projections: (B, K, H·D),
    before `to_add_out` (every family shares it; only their modulation differs)."""
    q = _norm(attn.norm_added_q, _heads(attn, attn.add_q_proj(normed)))
    k = _norm(attn.norm_added_k, _heads(attn, attn.add_k_proj(normed)))
    v = _heads(attn, attn.add_v_proj(normed))
    if rotate is not None:  # at a prompt's first text position (FLUX: zero, the identity; Qwen-Image: after the image)
        q, k = rotate(q), rotate(k)
    keys = torch.cat([k, image_keys], dim=1).transpose(1, 2)  # (B, H, K+N, D)
    values = torch.cat([v, image_values], dim=1).transpose(1, 2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values)  # (B, H, K, D)
    return out.transpose(1, 2).flatten(2).to(q.dtype)  # (B, K, H·D)


def _flux2_block_update(block: nn.Module, concepts: torch.Tensor, mod: torch.Tensor, image_keys: torch.Tensor,
                        image_values: torch.Tensor, rotate: Callable | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The text branch of diffusers 0.42 `Flux2TransformerBlock.forward` on the concept stream: plain LayerNorms
    modulated by `mod` (B, 6C), the transformer's `double_stream_modulation_txt` output shared by every block."""
    attn = block.attn
    mod = mod.unsqueeze(1)  # (B, 1, 6C), as Flux2Modulation.split
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
    normed = (1 + scale_msa) * block.norm1_context(concepts) + shift_msa
    out = _concept_attention(attn, normed, image_keys, image_values, rotate)  # (B, K, H·D)
    concepts = concepts + gate_msa * attn.to_add_out(out)
    normed = block.norm2_context(concepts) * (1 + scale_mlp) + shift_mlp
    concepts = concepts + gate_mlp * block.ff_context(normed)
    if concepts.dtype == torch.float16:
        concepts = concepts.clip(-65504, 65504)
    return concepts, out


def _qwen_block_update(block: nn.Module, concepts: torch.Tensor, temb: torch.Tensor, image_keys: torch.Tensor,
                       image_values: torch.Tensor, rotate: Callable | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The text branch of diffusers 0.42 `QwenImageTransformerBlock.forward` on the concept stream: `txt_mod(temb)`
    (B, 6C) = (shift, scale, gate) for attention then MLP, plain LayerNorms `txt_norm1` / `txt_norm2`, `txt_mlp`."""
    mod1, mod2 = block.txt_mod(temb).unsqueeze(1).chunk(2, dim=-1)  # (B, 1, 3C) each
    shift, scale, gate = mod1.chunk(3, dim=-1)
    out = _concept_attention(block.attn, block.txt_norm1(concepts) * (1 + scale) + shift, image_keys, image_values,
                             rotate)  # (B, K, H·D)
    concepts = concepts + gate * block.attn.to_add_out(out)
    shift, scale, gate = mod2.chunk(3, dim=-1)
    concepts = concepts + gate * block.txt_mlp(block.txt_norm2(concepts) * (1 + scale) + shift)
    if concepts.dtype == torch.float16:
        concepts = concepts.clip(-65504, 65504)
    return concepts, out


def concept_map(image_out: torch.Tensor, concept_out: torch.Tensor) -> torch.Tensor:
    """(B, N, K) softmax over concepts of output-space similarities (MMDiff eq. 4).

    Args:
        image_out: (B, N, H·D) image attention output before the output projection.
        concept_out: (B, K, H·D) concept attention output before the output projection.
    """
    sim = torch.einsum("bnd,bkd->bnk", image_out.float(), concept_out.float())
    return sim.softmax(dim=-1)


def concept_query_map(image_queries: torch.Tensor, concept_keys: torch.Tensor) -> torch.Tensor:
    """(B, N, K) concept maps of a cross-attention block: softmax over concepts of the image queries' scaled dot
    products with the concept keys, mean over heads.

    Args:
        image_queries: (B, N, H, D) after the block's q norm.
        concept_keys: (K, H, D) the concept tokens through the block's own key projection and k norm.
    """
    d = image_queries.shape[-1]
    logits = torch.einsum("bnhd,khd->bhnk", image_queries.float(), concept_keys.float()) / d**0.5
    return logits.softmax(dim=-1).mean(dim=1)


def cross_attention_map(
    image_queries: torch.Tensor,
    text_keys: torch.Tensor,
    image_keys: torch.Tensor | None,
    text_mask: torch.Tensor | None,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, N) image→text attention, averaged over heads and the prompt's tokens.

    The softmax runs over all keys [text; image] as in the model; the map is the mean probability
    each image query gives to one prompt token (padding excluded).

    Args:
        image_queries: (B, N, H, D) after `norm_q` (and RoPE).
        text_keys: (B, S, H, D) after `norm_added_k` (and RoPE).
        image_keys: (B, N, H, D) after `norm_k` (and RoPE); None in a cross-attention block (softmax over the text).
        text_mask: (B, S), 1 (True) on prompt tokens; None = every text token. Capture hands it over float32 on
            the attention's device already, so nothing moves inside an armed call.
        key_mask: (B, S) bool, the text keys the block attends to (`text_attention`); None: every one.
    """
    probs = text_attention(image_queries, text_keys, image_keys, key_mask)  # (B, N, S)
    if text_mask is None:
        return probs.mean(dim=-1)
    m = text_mask.to(probs.device, torch.float32)  # (B, S)
    return (probs * m[:, None]).sum(-1) / m.sum(-1).clamp(min=1)[:, None]
