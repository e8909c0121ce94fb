"""Which rows of a transformer call belong to which target sigma."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch


@dataclass
class Active:
    """One target sigma matched in the current call."""

    target: int  # index into the spec's sigmas
    rows: slice  # rows of the call's batch, in sample order (always contiguous)


@dataclass
class Gate:
    """Per-run bookkeeping of one capture: which calls and rows reach which target.

    A call is matched by the sigma of each of its rows: planned ones (from the schedule the sampler
    follows, or the batch layout of real-image mode: no value read back from the device) or, for a
    capture around an arbitrary pipeline call, the sigma received. Never by a call counter, which
    drifts under classifier-free guidance. The first call that reaches a target is the one captured:
    FLUX runs the conditional branch first, so the unconditional second call of true CFG finds its
    targets filled. With `cfg_in_batch` (SD3: one call carries [uncond; cond] rows, diffusers' layout),
    a call of 2·batch_size rows is captured from its second half only; calls of batch_size rows
    (skip-layer guidance, the extra forward) are conditional.
    """

    sigmas: tuple[float, ...]
    batch_size: int
    cfg_in_batch: bool = False
    filled: set[int] = field(default_factory=set)
    active: list[Active] = field(default_factory=list)

    def begin_call(self, values: Sequence[float], eps: float = float(torch.finfo(torch.float32).eps)) -> None:
        """Match one call whose rows carry sigmas `values`; `eps` is one ulp of the timestep's dtype."""
        n, b = len(values), self.batch_size
        cond = range(b, 2 * b) if self.cfg_in_batch and n == 2 * b else range(n)
        self.active = []
        for j, target in enumerate(self.sigmas):
            if j in self.filled:
                continue
            tol = eps * max(target, 1e-3) + 1e-6  # one ulp (bf16 on GPU), plus float32 round-off
            rows = [r for r in cond if abs(values[r] - target) <= tol]
            if not rows:
                continue
            if len(rows) != b or rows != list(range(rows[0], rows[0] + b)):
                raise RuntimeError(
                    f"sigma {target} reached {len(rows)} rows of a call; expected {b} (one per sample)")
            self.active.append(Active(target=j, rows=slice(rows[0], rows[0] + b)))

    def end_call(self) -> None:
        self.filled.update(a.target for a in self.active)
        self.active = []

    def cond_rows(self, n: int) -> range:
        """The conditional rows of a call of `n` rows."""
        b = self.batch_size
        return range(b, 2 * b) if self.cfg_in_batch and n == 2 * b else range(n)

    @property
    def missing(self) -> list[float]:
        return [s for j, s in enumerate(self.sigmas) if j not in self.filled]


def rows_of(kwargs: dict[str, Any], rows: range, total: int) -> dict[str, Any]:
    """The call's keyword arguments restricted to `rows` (tensors whose first axis is the batch)."""
    if len(rows) == total:
        return kwargs
    pick = slice(rows.start, rows.stop)
    return {k: (v[pick] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == total else v)
            for k, v in kwargs.items()}
