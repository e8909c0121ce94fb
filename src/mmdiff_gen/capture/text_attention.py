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
from typing import Any

import torch
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn


def _heads(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x.unflatten(-1, (attn.heads, -1))  # (B, S, H·D) → (B, S, H, D)


def _norm(norm: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    return x if norm is None else norm(x)


def text_attention(image_queries: torch.Tensor, text_keys: torch.Tensor, image_keys: torch.Tensor) -> torch.Tensor:
    """(B, N, S) float32: for each image query, the attention probability of each text key, mean over heads.

    Args:
        image_queries: (B, N, H, D) after the q norm (and RoPE).
        text_keys: (B, S, H, D) after the added-k norm (and RoPE).
        image_keys: (B, N, H, D) after the k norm (and RoPE).
    """
    b, n, h, d = image_queries.shape
    s = text_keys.shape[1]
    keys = torch.cat([text_keys, image_keys], dim=1)  # (B, S+N, H, D)
    total = image_queries.new_zeros(b, n, s, dtype=torch.float32)
    for head in range(h):  # one head at a time: (B, N, S+N) stays small at 1024²
        logits = torch.einsum("bnd,bmd->bnm", image_queries[:, :, head].float(), keys[:, :, head].float())
        total += (logits / math.sqrt(d)).softmax(dim=-1)[..., :s]
    return total / h


class TextAttentionTap:
    """Hooks on chosen blocks that record image→text attention (B, N, S) per target sigma and layer.

    Args:
        blocks: every text-image block in forward order (Backbone.attention_blocks).
        layers: indices into `blocks`, in the order of the result's L axis.
        store_device: where the (B, N, S) maps go as soon as they are computed (None: stay put); a
            probe of every FLUX.1-dev block holds gigabytes of them.
    """

    def __init__(self, blocks: list[nn.Module], layers: tuple[int, ...], store_device=None):
        if max(layers) >= len(blocks):
            raise ValueError(f"text-attention layers {layers} out of range: the backbone has {len(blocks)} blocks")
        if any(getattr(blocks[i].attn, "fused_projections", False) for i in layers):
            raise ValueError("text attention needs unfused QKV projections: call transformer.unfuse_qkv_projections()")
        self.blocks, self.layers, self.store_device = blocks, layers, store_device
        self.handles: list[Any] = []
        self._scratch: dict[str, Any] = {}
        self._rows: torch.Tensor | None = None
        self._targets: list[tuple[int, slice]] = []
        self.store: dict[int, dict[int, torch.Tensor]] = {}  # target → slot → (B, N, S)

    def attach(self) -> None:
        for slot, idx in enumerate(self.layers):
            blk = self.blocks[idx]
            attn = blk.attn
            self.handles += [
                blk.register_forward_pre_hook(self._on_block_start, with_kwargs=True),
                attn.to_q.register_forward_hook(self._keep("q")),
                attn.to_k.register_forward_hook(self._keep("k")),
                blk.register_forward_hook(self._on_block_end(slot)),
            ]
            if getattr(attn, "add_k_proj", None) is not None:
                self.handles.append(attn.add_k_proj.register_forward_hook(self._keep("text_k")))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def begin_call(self, active) -> None:
        self._targets, self._rows = [], None
        if not active:
            return
        self._rows = torch.cat([a.rows for a in active])
        start = 0
        for a in active:
            self._targets.append((a.target, slice(start, start + a.rows.numel())))
            start += a.rows.numel()

    def end_call(self) -> None:
        self._rows = None
        self._scratch.clear()

    def _keep(self, name):
        def hook(_module, _inputs, output):
            # The block's own projection runs first; a concept stream calling the same module
            # later in the block (capture.concepts) must not replace it.
            if self._rows is not None and name not in self._scratch:
                self._scratch[name] = output
        return hook

    def _on_block_start(self, _module, _args, kwargs):
        if self._rows is not None:
            self._scratch.clear()
            self._scratch["rotary"] = kwargs.get("image_rotary_emb")
            enc = kwargs.get("encoder_hidden_states")
            self._scratch["text_len"] = None if enc is None else enc.shape[1]

    def _on_block_end(self, slot: int):
        @torch.no_grad()
        def hook(block, _inputs, _output):
            if self._rows is None:
                return
            sc, rows, attn = self._scratch, self._rows.to(self._scratch["q"].device), block.attn
            q = _norm(attn.norm_q, _heads(attn, sc["q"][rows]))
            k = _norm(attn.norm_k, _heads(attn, sc["k"][rows]))
            if "text_k" in sc:  # a joint block: image projections here, text through the added projections
                tk = _norm(attn.norm_added_k, _heads(attn, sc["text_k"][rows]))
            else:  # FLUX single-stream: one projection over [text; image]
                s = sc["text_len"]
                q, tk, k = q[:, s:], k[:, :s], k[:, s:]
            rotary = sc["rotary"]
            if rotary is not None:  # FLUX: positions [text; image]
                s, n = tk.shape[1], q.shape[1]
                img = (rotary[0][s : s + n], rotary[1][s : s + n])
                q, k = apply_rotary_emb(q, img, sequence_dim=1), apply_rotary_emb(k, img, sequence_dim=1)
                tk = apply_rotary_emb(tk, (rotary[0][:s], rotary[1][:s]), sequence_dim=1)
            probs = text_attention(q, tk, k)  # (R, N, S)
            if self.store_device is not None:
                probs = probs.to(self.store_device)
            for target, part in self._targets:
                self.store.setdefault(target, {})[slot] = probs[part]
        return hook
