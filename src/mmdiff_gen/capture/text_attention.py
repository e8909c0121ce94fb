"""Image→text attention of chosen blocks, per prompt token (Seg4Diff's grounding signal).

Seg4Diff finds MM-DiT layers whose text→image attention segments the objects a prompt names. The
probabilities are recomputed from the block's own queries and keys: softmax(q·kᵀ/√d) over every
key the block attends to ([text; image], in whatever order the family concatenates them — the
softmax does not care), averaged over heads, keeping the image-query × text-key block.

Blocks are indexed in forward order over every block that mixes text and image: FLUX's double-stream
blocks, then its single-stream blocks (which attend over the concatenated [text; image] sequence);
SD3's joint blocks.
"""

from __future__ import annotations

import math

from typing import Callable

import torch
from torch import nn


def _heads(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x.unflatten(-1, (attn.heads, -1))  # (B, S, H·D) → (B, S, H, D)


def _norm(norm: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    return x if norm is None else norm(x)


def image_text_qk(attn: nn.Module, kept: dict,
                  rotate: Callable[[torch.Tensor, object, str], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image queries (B, N, H, D), text keys (B, S, H, D) and image keys (B, N, H, D) of one block — normed and
    rotated as the block attends — from the outputs of its projections.

    Args:
        attn: the block's attention module.
        kept: "to_q", "to_k" (and "add_k_proj" for a joint block) outputs; "rotary": the block's
            `image_rotary_emb` (or None); "text_len": S of a FLUX single-stream block.
        rotate: the backbone's `Backbone.rotate` (how its family applies `rotary` to text and image tokens).
    """
    if getattr(attn, "is_cross_attention", False):  # Wan's attn2: keys from the text alone; q / k norms across heads
        return _heads(attn, attn.norm_q(kept["to_q"])), _heads(attn, attn.norm_k(kept["to_k"])), None
    q = _norm(attn.norm_q, _heads(attn, kept["to_q"]))
    k = _norm(attn.norm_k, _heads(attn, kept["to_k"]))
    if "add_k_proj" in kept:  # a joint block: image projections here, text through the added projections
        tk = _norm(attn.norm_added_k, _heads(attn, kept["add_k_proj"]))
    else:  # FLUX single-stream: one projection over [text; image]
        s = kept["text_len"]
        q, tk, k = q[:, s:], k[:, :s], k[:, s:]
    rotary = kept["rotary"]
    q, k = rotate(q, rotary, "image"), rotate(k, rotary, "image")
    return q, rotate(tk, rotary, "text"), k


def text_logits(image_queries: torch.Tensor, text_keys: torch.Tensor) -> torch.Tensor:
    """(B, N, S) float32 pre-softmax image→text logits q·kᵀ/√d, mean over heads (differentiable); shapes as in
    `text_attention`."""
    d = image_queries.shape[-1]
    return torch.einsum("bnhd,bshd->bns", image_queries.float(), text_keys.float()) / (math.sqrt(d) * image_queries.shape[2])


def text_attention(image_queries: torch.Tensor, text_keys: torch.Tensor, image_keys: torch.Tensor | None,
                   key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, N, S) float32: for each image query, the attention probability of each text key, mean over heads.

    Args:
        image_queries: (B, N, H, D) after the q norm (and RoPE).
        text_keys: (B, S, H, D) after the added-k norm (and RoPE).
        image_keys: (B, N, H, D) after the k norm (and RoPE); None in a cross-attention block (the image queries see
            the text keys alone).
        key_mask: (B, S) bool, the text keys the block attends to (Qwen-Image masks the padding of a batch's
            shorter prompts: `encoder_hidden_states_mask`); None: every one (FLUX, SD3).
    """
    b, n, h, d = image_queries.shape
    s = text_keys.shape[1]
    keys = text_keys if image_keys is None else torch.cat([text_keys, image_keys], dim=1)  # (B, S[+N], H, D)
    bias = None
    if key_mask is not None:  # −inf on masked text keys, as the block's own attention mask
        bias = torch.zeros(b, 1, keys.shape[1], device=keys.device, dtype=torch.float32)
        bias[:, 0, :s].masked_fill_(~key_mask.to(keys.device, torch.bool), float("-inf"))
    total = image_queries.new_zeros(b, n, s, dtype=torch.float32)
    for head in range(h):  # one head at a time: (B, N, S+N) stays small at 1024²
        logits = torch.einsum("bnd,bmd->bnm", image_queries[:, :, head].float(), keys[:, :, head].float()) / math.sqrt(d)
        if bias is not None:
            logits = logits + bias
        total += logits.softmax(dim=-1)[..., :s]
    return total / h
