"""The token aggregation module (MMDiff §3.1 eq. 2, App. F): fuse one layer's features over timesteps."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cbam import CBAM

#: Sequences per SDPA call. CUDA's fused kernels put the batch on a grid axis of at most 65 535 blocks, and the
#: heads' batch is B·N tokens (FLUX at 1024², a batch of 16: 16 × 4 096 = 65 536).
SDPA_MAX_BATCH = 32_768


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class TemporalAttention(nn.Module):
    """Multi-head self-attention over the T axis of many short sequences, through fused SDPA.

    nn.MultiheadAttention falls back to explicit bmm + softmax + dropout whenever dropout is on, which
    dominated training time here (B·N sequences of length 4); SDPA runs the same math fused.
    """

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, t, d = x.shape  # (sequences, T, D)
        q, k, v = self.qkv(x).view(s, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # 3 × (S, H, T, d/H)
        p = self.dropout if self.training else 0.0
        if s <= SDPA_MAX_BATCH:
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        else:
            o = torch.cat([F.scaled_dot_product_attention(*c, dropout_p=p) for c in zip(
                q.split(SDPA_MAX_BATCH), k.split(SDPA_MAX_BATCH), v.split(SDPA_MAX_BATCH))])
        return self.out(o.transpose(1, 2).reshape(s, t, d))


class TemporalBlock(nn.Module):
    """Pre-norm transformer layer over the timestep axis with LayerScale on both residual branches."""

    def __init__(self, dim: int, heads: int, dropout: float, layer_scale: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TemporalAttention(dim, heads, dropout)
        self.ls1 = LayerScale(dim, layer_scale)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim),
                                 nn.Dropout(dropout))
        self.ls2 = LayerScale(dim, layer_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.ls1(self.attn(h))
        return x + self.ls2(self.mlp(self.norm2(x)))


class TokenAggregation(nn.Module):
    """Fuse one captured layer's features over T timesteps into one (B, D, h, w) map.

    F_fused = CBAM(Σ_t α_t · F_t^proj) + g · F_clean^proj, with α a per-pixel softmax over t.

    Args:
        in_dim: C, the backbone's feature width (3072 for FLUX.1-dev).
        dim: D, the projected width (768 in the paper: C/4).
        num_timesteps: T.
        clean_index: index along T of the cleanest timestep (the skip source); default T − 1, since
            capture orders sigmas noisiest first.
        depth: transformer layers over the T axis (paper: 3).
        heads: attention heads (paper: 8); must divide `dim`.
        dropout: paper 0.1.
        layer_scale: LayerScale init (1e-4 in §3.1; App. F says 1e-6).
        skip_init: initial value of the learnable skip gate g (App. F: 0.1).

    Input: (B, T, N, C) features and the token grid (h, w), N = h·w. Output: (B, D, h, w).
    `last_weights` keeps the (B, T, h, w) mixing weights of the latest forward, for inspection.
    """

    def __init__(self, in_dim: int, dim: int, num_timesteps: int, *, clean_index: int | None = None, depth: int = 3,
                 heads: int = 8, dropout: float = 0.1, layer_scale: float = 1e-4, skip_init: float = 0.1):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        if num_timesteps < 1:
            raise ValueError("num_timesteps must be ≥ 1")
        self.num_timesteps = num_timesteps
        self.clean_index = num_timesteps - 1 if clean_index is None else clean_index
        # Per-timestep normaliser and projector: massive activations differ across t and layers.
        self.norms = nn.ModuleList(nn.LayerNorm(in_dim) for _ in range(num_timesteps))
        self.projs = nn.ModuleList(nn.Linear(in_dim, dim) for _ in range(num_timesteps))
        self.time_embed = nn.Parameter(torch.zeros(num_timesteps, dim))
        nn.init.trunc_normal_(self.time_embed, std=0.02)
        self.blocks = nn.ModuleList(TemporalBlock(dim, heads, dropout, layer_scale) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        # Per-pixel, per-timestep mixing logit (a 1×1 conv); no bias: the softmax over t ignores it.
        self.mix = nn.Linear(dim, 1, bias=False)
        self.cbam = CBAM(dim)
        self.skip_gate = nn.Parameter(torch.tensor(float(skip_init)))
        self.last_weights: torch.Tensor | None = None

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, t, n, _ = features.shape
        h, w = grid
        if t != self.num_timesteps or n != h * w:
            raise ValueError(f"expected (B, {self.num_timesteps}, {h * w}, C) features, got {tuple(features.shape)}")
        proj = torch.stack([p(nm(features[:, i].float())) for i, (nm, p) in enumerate(zip(self.norms, self.projs))], 2)
        # proj: (B, N, T, D) → one length-T sequence per pixel
        seq = proj.reshape(b * n, t, -1) + self.time_embed
        for blk in self.blocks:
            seq = blk(seq)
        alpha = self.mix(self.norm(seq)).squeeze(-1).softmax(-1)  # (B·N, T)
        fused = (alpha.unsqueeze(-1) * proj.reshape(b * n, t, -1)).sum(1)  # (B·N, D)
        fused = fused.reshape(b, h, w, -1).permute(0, 3, 1, 2)  # (B, D, h, w)
        clean = proj[:, :, self.clean_index].reshape(b, h, w, -1).permute(0, 3, 1, 2)
        self.last_weights = alpha.detach().reshape(b, h, w, t).permute(0, 3, 1, 2)
        return self.cbam(fused) + self.skip_gate * clean
