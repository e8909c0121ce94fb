"""Concept attention (MMDiff §3.2, after ConceptAttention) and the averaged cross-attention baseline.

A separate stream of concept tokens runs through the joint blocks (FLUX double-stream blocks, SD3
JointTransformerBlocks) with the text stream's weights. Concept queries attend to [concept keys;
image keys]; image and text queries never see concept keys, so generation is untouched. The stock
block runs unchanged: hooks read the image projections and attention output it computes, and the
concept update below reuses them. Both families' blocks share these module names; SD3-medium has
no q/k norms (None) and its last block is `context_pre_only` (no text output).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn

from .text_attention import _heads, _norm, text_attention


def concept_block_update(
    block: nn.Module,
    concepts: torch.Tensor,
    temb: torch.Tensor,
    image_keys: torch.Tensor,
    image_values: torch.Tensor,
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

    Returns:
        (concepts after the block (B, K, C), concept attention output before `to_add_out` (B, K, H·D)).
    """
    attn = block.attn
    last = getattr(block, "context_pre_only", False)
    if last:
        normed = block.norm1_context(concepts, temb)
    else:
        normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1_context(concepts, emb=temb)
    q = _norm(attn.norm_added_q, _heads(attn, attn.add_q_proj(normed)))
    k = _norm(attn.norm_added_k, _heads(attn, attn.add_k_proj(normed)))
    v = _heads(attn, attn.add_v_proj(normed))
    # Concept positions are zero: RoPE is the identity on them.
    keys = torch.cat([k, image_keys], dim=1).transpose(1, 2)  # (B, H, K+N, D)
    values = torch.cat([v, image_values], dim=1).transpose(1, 2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values)  # (B, H, K, D)
    out = out.transpose(1, 2).flatten(2).to(q.dtype)  # (B, K, H·D)
    if last:
        return concepts, out

    concepts = concepts + gate_msa.unsqueeze(1) * attn.to_add_out(out)
    normed = block.norm2_context(concepts) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    concepts = concepts + gate_mlp.unsqueeze(1) * block.ff_context(normed)
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


def cross_attention_map(
    image_queries: torch.Tensor,
    text_keys: torch.Tensor,
    image_keys: torch.Tensor,
    text_mask: torch.Tensor | None,
) -> torch.Tensor:
    """(B, N) image→text attention, averaged over heads and the prompt's tokens.

    The softmax runs over all keys [text; image] as in the model; the map is the mean probability
    each image query gives to one prompt token (padding excluded).

    Args:
        image_queries: (B, N, H, D) after `norm_q` (and RoPE).
        text_keys: (B, S, H, D) after `norm_added_k` (and RoPE).
        image_keys: (B, N, H, D) after `norm_k` (and RoPE).
        text_mask: (B, S) bool, True on prompt tokens; None = every text token.
    """
    probs = text_attention(image_queries, text_keys, image_keys)  # (B, N, S)
    if text_mask is None:
        return probs.mean(dim=-1)
    m = text_mask.to(probs.device, torch.float32)  # (B, S)
    return (probs * m[:, None]).sum(-1) / m.sum(-1).clamp(min=1)[:, None]


class ConceptTap:
    """Hooks on the joint blocks that run the concept stream and accumulate maps per target sigma.

    Args:
        blocks: the backbone's joint blocks (FLUX double-stream blocks, SD3 joint blocks).
        layers: block indices whose maps are averaged; the stream runs through blocks 0..max(layers).
        init_concepts: (K, C) initial concept tokens, or None when only cross-attention is wanted.
        make_temb: callable(timestep (R,), guidance (R,) | None) → (R, C) concept modulation.
        cross_attention: also accumulate the averaged cross-attention map.
        text_mask: (B, S) bool prompt-token mask for cross-attention, in sample order.
    """

    def __init__(
        self,
        blocks: nn.ModuleList,
        layers: tuple[int, ...],
        init_concepts: torch.Tensor | None,
        make_temb,
        cross_attention: bool,
        text_mask: torch.Tensor | None,
    ):
        if max(layers) >= len(blocks):
            raise ValueError(f"concept layers {layers} out of range: the backbone has {len(blocks)} joint blocks")
        for blk in blocks:
            if getattr(blk.attn, "fused_projections", False):
                raise ValueError("concept capture needs unfused QKV projections: call transformer.unfuse_qkv_projections()")
        self.blocks = blocks
        self.layers = layers
        self.init = init_concepts
        self.make_temb = make_temb
        self.cross = cross_attention
        self.text_mask = text_mask
        self.handles: list[Any] = []
        self._scratch: dict[str, Any] = {}
        self._busy = False
        self._stream: torch.Tensor | None = None
        self._temb: torch.Tensor | None = None
        self._rows: torch.Tensor | None = None
        self._targets: list[tuple[int, slice]] = []
        # Per target sigma: summed maps over layers. Filled by `end_call`.
        self.concept_sum: dict[int, torch.Tensor] = {}
        self.cross_sum: dict[int, torch.Tensor] = {}

    # --- lifecycle --------------------------------------------------------------------------
    def attach(self) -> None:
        for idx in range(max(self.layers) + 1):
            blk = self.blocks[idx]
            attn = blk.attn
            self.handles += [
                blk.register_forward_pre_hook(self._on_block_start, with_kwargs=True),
                attn.to_k.register_forward_hook(self._keep("image_keys")),  # (B, N, H·D), before norm_k
                attn.to_v.register_forward_hook(self._keep("image_values")),
                attn.to_out[0].register_forward_pre_hook(self._keep_input("image_out")),
                blk.register_forward_hook(self._on_block_end(idx)),
            ]
            if self.cross:
                self.handles += [
                    attn.to_q.register_forward_hook(self._keep("image_queries")),
                    attn.add_k_proj.register_forward_hook(self._keep("text_keys")),
                ]

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def begin_call(self, active, timestep: torch.Tensor, guidance: torch.Tensor | None) -> None:
        """Start a transformer call: select the active rows and reset the concept stream."""
        self._targets = []
        if not active:
            self._rows = None
            return
        self._rows = torch.cat([a.rows for a in active]).to(timestep.device)
        start = 0
        for a in active:
            self._targets.append((a.target, slice(start, start + a.rows.numel())))
            start += a.rows.numel()
        if self.init is not None:
            r = self._rows.numel()
            self._stream = self.init.unsqueeze(0).expand(r, -1, -1)  # (R, K, C)
            g = None if guidance is None else guidance[self._rows]
            self._temb = self.make_temb(timestep[self._rows], g)

    def end_call(self) -> None:
        self._rows = None
        self._stream = self._temb = None
        self._scratch.clear()

    # --- hooks ------------------------------------------------------------------------------
    def _keep(self, name):
        def hook(_module, _inputs, output):
            if self._rows is not None and not self._busy:
                self._scratch[name] = output
        return hook

    def _keep_input(self, name):
        def hook(_module, inputs):
            if self._rows is not None and not self._busy:
                self._scratch[name] = inputs[0]
        return hook

    def _on_block_start(self, _module, _args, kwargs):
        if self._rows is not None:
            self._scratch["rotary"] = kwargs.get("image_rotary_emb")

    def _on_block_end(self, idx: int):
        def hook(block, _inputs, _output):
            if self._rows is None:
                return
            # The concept update calls the block's own submodules: keep their hooks from
            # overwriting what the stock forward recorded.
            self._busy = True
            try:
                self._run(block, idx)
            finally:
                self._busy = False
        return hook

    def _run(self, block: nn.Module, idx: int) -> None:
        sc, rows = self._scratch, self._rows
        attn = block.attn
        image_keys = _norm(attn.norm_k, _heads(attn, sc["image_keys"][rows]))  # (R, N, H, D), not yet rotated
        n = image_keys.shape[1]
        rotary = sc["rotary"]
        img_rot = None if rotary is None else (rotary[0][-n:], rotary[1][-n:])
        if img_rot is not None:
            image_keys = apply_rotary_emb(image_keys, img_rot, sequence_dim=1)
        image_values = _heads(attn, sc["image_values"][rows])

        if self.init is not None:
            self._stream, concept_out = concept_block_update(block, self._stream, self._temb, image_keys, image_values)
            if idx in self.layers:
                maps = concept_map(sc["image_out"][rows], concept_out)  # (R, N, K)
                self._accumulate(self.concept_sum, maps)
        if self.cross and idx in self.layers:
            q = _norm(attn.norm_q, _heads(attn, sc["image_queries"][rows]))
            tk = _norm(attn.norm_added_k, _heads(attn, sc["text_keys"][rows]))
            if rotary is not None:
                q = apply_rotary_emb(q, img_rot, sequence_dim=1)
                s = tk.shape[1]
                tk = apply_rotary_emb(tk, (rotary[0][:s], rotary[1][:s]), sequence_dim=1)
            mask = None
            if self.text_mask is not None:
                mask = torch.cat([self.text_mask for _ in self._targets]).to(q.device)
            self._accumulate(self.cross_sum, cross_attention_map(q, tk, image_keys, mask))

    def _accumulate(self, store: dict[int, torch.Tensor], value: torch.Tensor) -> None:
        for target, part in self._targets:
            v = value[part].float()
            store[target] = v if target not in store else store[target] + v
