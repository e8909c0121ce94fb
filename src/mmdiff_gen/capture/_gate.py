"""Which rows of a transformer call belong to which target sigma, decided by the sigma received."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Active:
    """One target sigma matched in the current call."""

    target: int  # index into the spec's sigmas
    rows: torch.Tensor  # (B,) long: rows of the call's batch, in sample order
    sigma: torch.Tensor  # (B,) float32: the sigmas those rows received


@dataclass
class Gate:
    """Per-run bookkeeping shared by every tap of one capture.

    A step is identified by the sigma the transformer actually received (never by a call counter,
    which drifts under classifier-free guidance). The first call that reaches a target is the one
    captured: FLUX runs the conditional branch first, so the unconditional second call of true CFG
    finds its targets already filled and is ignored. With `cfg_in_batch` (SD3: one call carries
    [uncond; cond] rows, diffusers' layout), a call of 2·batch_size rows is captured from its second
    half only; calls of batch_size rows (skip-layer guidance, the extra forward) are conditional.
    """

    sigmas: tuple[float, ...]
    batch_size: int
    cfg_in_batch: bool = False
    received: dict[int, torch.Tensor] = field(default_factory=dict)  # target → (B,) sigmas received
    active: list[Active] = field(default_factory=list)
    cond_kwargs: dict[str, Any] | None = None
    _last_sigma: float | None = None

    def begin_call(self, sigma: torch.Tensor, kwargs: dict[str, Any]) -> None:
        """Called before each transformer forward with the (rows,) sigmas it received."""
        # One ulp of the dtype the timestep was sent in (bf16 on GPU), plus float32 round-off.
        eps = torch.finfo(sigma.dtype).eps
        values = sigma.detach().float().flatten().tolist()  # one device sync per call
        n, b = len(values), self.batch_size
        cond = range(b, 2 * b) if self.cfg_in_batch and n == 2 * b else range(n)
        if self._last_sigma is None or values[0] != self._last_sigma:
            self.cond_kwargs = _rows_of(kwargs, cond, len(values))  # a new step: its conditional call
        self._last_sigma = values[0]
        self.active = []
        for j, target in enumerate(self.sigmas):
            if j in self.received:
                continue
            tol = eps * max(target, 1e-3) + 1e-6
            rows = [r for r in cond if abs(values[r] - target) <= tol]
            if not rows:
                continue
            if len(rows) != self.batch_size:
                raise RuntimeError(
                    f"sigma {target} reached {len(rows)} rows of a call; expected {self.batch_size} (one per sample)"
                )
            self.active.append(Active(target=j, rows=torch.tensor(rows), sigma=torch.tensor([values[r] for r in rows])))

    def end_call(self) -> None:
        for a in self.active:
            self.received[a.target] = a.sigma
        self.active = []

    @property
    def missing(self) -> list[float]:
        return [s for j, s in enumerate(self.sigmas) if j not in self.received]


def _rows_of(kwargs: dict[str, Any], rows: range, total: int) -> dict[str, Any]:
    """The call's keyword arguments restricted to `rows` (tensors whose first axis is the batch)."""
    if len(rows) == total:
        return kwargs
    pick = slice(rows.start, rows.stop)
    return {k: (v[pick] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == total else v)
            for k, v in kwargs.items()}
