"""Forward hooks that copy image-token features of chosen blocks at the target sigmas."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn


class FeatureTap:
    """Writes each chosen block's image tokens into a preallocated (B, L, T, N, C) buffer.

    The buffer is allocated on the first capture, once B, N and C are known, in the store dtype
    on the store device; each (layer, sigma) slot is written exactly once.

    Args:
        blocks: the backbone's feature blocks (FLUX single-stream blocks).
        layers: block indices, in buffer order.
        num_sigmas: T, the number of target sigmas.
        image_tokens: callable(block output) → (rows, N, C) image tokens.
        store_dtype: dtype of the buffer.
        store_device: device of the buffer; None = the device the features were produced on.
    """

    def __init__(
        self,
        blocks: nn.ModuleList,
        layers: tuple[int, ...],
        num_sigmas: int,
        image_tokens: Callable[[Any], torch.Tensor],
        store_dtype: torch.dtype,
        store_device: str | torch.device | None,
    ):
        if max(layers) >= len(blocks):
            raise ValueError(f"capture layers {layers} out of range: the backbone has {len(blocks)} feature blocks")
        self.blocks = blocks
        self.layers = layers
        self.num_sigmas = num_sigmas
        self.image_tokens = image_tokens
        self.store_dtype = store_dtype
        self.store_device = store_device
        self.buffer: torch.Tensor | None = None
        self.active: list = []
        self.handles: list[Any] = []

    def attach(self) -> None:
        for slot, idx in enumerate(self.layers):
            self.handles.append(self.blocks[idx].register_forward_hook(self._hook(slot)))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _hook(self, slot: int):
        def hook(_module, _inputs, output):
            if not self.active:
                return
            tokens = self.image_tokens(output)  # (rows, N, C)
            for a in self.active:
                part = tokens[a.rows.to(tokens.device)]
                if self.buffer is None:
                    b = part.shape[0]
                    device = self.store_device if self.store_device is not None else part.device
                    self.buffer = torch.empty(
                        (b, len(self.layers), self.num_sigmas, *part.shape[1:]), dtype=self.store_dtype, device=device
                    )
                self.buffer[:, slot, a.target] = part.to(device=self.buffer.device, dtype=self.store_dtype)
        return hook
