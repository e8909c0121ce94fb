"""Peak bytes of live tensors allocated by torch ops inside a block, on any device (CPU included).

CUDA has torch.cuda.max_memory_allocated; the CPU has no such counter, and process RSS hides
allocations behind malloc's reuse. This dispatch mode counts every storage an op creates while any
tensor using it is alive, and keeps the peak. Storages that existed before (weights) are not counted.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakTensorMemory(TorchDispatchMode):
    def __init__(self, existing: list[torch.Tensor] = ()):
        super().__init__()
        self.skip = {t.untyped_storage().data_ptr() for t in existing}
        self.refs: dict[int, int] = {}  # storage ptr → live tensors using it
        self.size: dict[int, int] = {}
        self.live = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.live -= self.size.pop(key)
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            key = st.data_ptr()
            if key == 0 or key in self.skip:
                continue
            if key not in self.refs:
                self.refs[key] = 0
                self.size[key] = st.nbytes()
                self.live += st.nbytes()
                self.peak = max(self.peak, self.live)
            self.refs[key] += 1
            weakref.finalize(t, self._release, key)
        return out
