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
    finds its targets already filled and is ignored.
    """

    sigmas: tuple[float, ...]
    batch_size: int
    received: dict[int, torch.Tensor] = field(default_factory=dict)  # target → (B,) sigmas received
    active: list[Active] = field(default_factory=list)
    cond_kwargs: dict[str, Any] | None = None
    _last_sigma: float | None = None

    def begin_call(self, sigma: torch.Tensor, kwargs: dict[str, Any]) -> None:
        """Called before each transformer forward with the (rows,) sigmas it received."""
        # One ulp of the dtype the timestep was sent in (bf16 on GPU), plus float32 round-off.
        eps = torch.finfo(sigma.dtype).eps
        sigma = sigma.detach().float().flatten().cpu()
        first = float(sigma[0])
        if self._last_sigma is None or first != self._last_sigma:
            self.cond_kwargs = kwargs  # a new step: the conditional call (see class doc)
        self._last_sigma = first
        self.active = []
        for j, target in enumerate(self.sigmas):
            if j in self.received:
                continue
            rows = ((sigma - target).abs() <= eps * max(target, 1e-3) + 1e-6).nonzero().flatten()
            if rows.numel() == 0:
                continue
            if rows.numel() != self.batch_size:
                raise RuntimeError(
                    f"sigma {target} reached {rows.numel()} rows of a call; expected {self.batch_size} (one per sample)"
                )
            self.active.append(Active(target=j, rows=rows, sigma=sigma[rows]))

    def end_call(self) -> None:
        for a in self.active:
            self.received[a.target] = a.sigma
        self.active = []

    @property
    def missing(self) -> list[float]:
        return [s for j, s in enumerate(self.sigmas) if j not in self.received]
