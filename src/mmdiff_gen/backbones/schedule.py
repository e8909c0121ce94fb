"""The timestep contract: the sampler's schedule is made to pass through the configured sigmas exactly.

Heads are trained on real images noised to exact sigmas, so generation must hand them features at
those same sigmas. FLUX's default shifted schedule only comes near them (28 steps at 512²: 0.772,
0.511, 0.238, 0.065 for 0.78, 0.52, 0.26, 0.001) and never reaches 0.001. The contract:

* every target at or above the last evaluated sigma replaces the schedule step nearest to it; the
  step count and every other step stay as they were (no extra cost);
* every target below the last evaluated sigma is evaluated by one extra transformer forward on the
  final latent, noised to that sigma exactly as real-image mode does (cost: one forward, i.e. 1/N of
  the transformer time, or 1/(2N) under true CFG since only the conditional branch is run).

The scheduler applies its resolution shift to any `sigmas=` it is given, so the placed values are
passed pre-inverted, refined to the float32 input whose shifted value is the target exactly. A scheduler with a
`shift_terminal` (Qwen-Image: 0.02) ends every schedule at that sigma: its last step stays where it is and the
targets below it are extra forwards.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np


@dataclass(frozen=True)
class ContractSchedule:
    """A schedule that honours the targets.

    Attributes:
        pipeline_sigmas: what to pass as `pipe(sigmas=...)` (pre-shift inputs, length N).
        sigmas: the N sigmas the transformer will receive, after the scheduler's shift.
        steps: target sigma → step index for targets placed on the schedule.
        extra: targets evaluated by one extra forward on the final latent.
        default_sigmas: the N sigmas of the untouched default schedule (for reports).
    """

    pipeline_sigmas: tuple[float, ...]
    sigmas: tuple[float, ...]
    steps: dict[float, int]
    extra: tuple[float, ...]
    default_sigmas: tuple[float, ...]

    @property
    def extra_forwards(self) -> int:
        return len(self.extra)


_NON_ELEMENTWISE = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas")


def _shifted(scheduler: Any, inputs: np.ndarray, mu: float | None) -> np.ndarray:
    """The sigmas a scheduler derives from `inputs` (float32), without touching the live scheduler."""
    probe = copy.deepcopy(scheduler)
    probe.set_timesteps(sigmas=[float(x) for x in inputs], mu=mu)
    return probe.sigmas[: len(inputs)].double().cpu().numpy()


def _inverse_shift(scheduler: Any, target: float, mu: float | None) -> float:
    cfg = scheduler.config
    if cfg.get("use_dynamic_shifting"):
        if cfg.get("time_shift_type", "exponential") == "linear":
            return 1.0 / (1.0 + mu * (1.0 / target - 1.0))
        return 1.0 / (1.0 + math.exp(mu) * (1.0 / target - 1.0))
    s = float(cfg.get("shift", 1.0))
    return target / (s - (s - 1.0) * target)


def _shift(scheduler: Any, u: float, mu: float | None) -> float:
    """The scheduler's time shift of one input, before any terminal stretch (the inverse of `_inverse_shift`)."""
    cfg = scheduler.config
    if cfg.get("use_dynamic_shifting"):
        if cfg.get("time_shift_type", "exponential") == "linear":
            return mu / (mu + (1.0 / u - 1.0))
        return math.exp(mu) / (math.exp(mu) + (1.0 / u - 1.0))
    s = float(cfg.get("shift", 1.0))
    return s * u / (1.0 + (s - 1.0) * u)


def _place(scheduler: Any, target: float, mu: float | None, last_input: np.float32) -> float:
    """The float32 input the scheduler shifts to float32(target) exactly (or to its nearest value), in a schedule
    whose last input is `last_input`.

    A `shift_terminal` scheduler (Qwen-Image's: 0.02) stretches the shifted schedule so that its last sigma is the
    terminal: σ ↦ 1 − (1 − σ)·(1 − terminal)/(1 − σ_last), affine once the last step's σ_last is known. The contract
    never moves the last step, so every placed input is found against the same stretch (probed with it appended)."""
    terminal = scheduler.config.get("shift_terminal")
    pre = target
    if terminal:
        pre = 1.0 - (1.0 - target) * (1.0 - _shift(scheduler, float(last_input), mu)) / (1.0 - terminal)
    u0 = np.float32(_inverse_shift(scheduler, pre, mu))
    cands = [u0]
    up = down = u0
    for _ in range(8):  # a few ulps either side absorb float32 rounding inside the shift
        up, down = np.nextafter(up, np.float32(2)), np.nextafter(down, np.float32(-1))
        cands += [up, down]
    cands = np.array([c for c in cands if 0 < c <= 1], dtype=np.float32)
    got = _shifted(scheduler, np.append(cands, last_input), mu)[:-1] if terminal else _shifted(scheduler, cands, mu)
    want = float(np.float32(target))
    return float(cands[int(np.argmin(np.abs(got - want)))])


def contract_schedule(
    scheduler: Any,
    num_inference_steps: int,
    targets: Sequence[float],
    mu: float | None,
) -> ContractSchedule:
    """Build the schedule that evaluates the transformer at every target sigma.

    Args:
        scheduler: the pipeline's FlowMatchEulerDiscreteScheduler (left untouched).
        num_inference_steps: N, the sampler's step count.
        targets: sigmas in (0, 1] to capture at.
        mu: the resolution shift the pipeline will pass (None for a static shift).
    """
    for key in _NON_ELEMENTWISE:
        if scheduler.config.get(key):
            raise ValueError(f"the timestep contract needs an elementwise sigma shift; scheduler sets {key}")
    n = int(num_inference_steps)
    if n < 1:
        raise ValueError("num_inference_steps must be ≥ 1")
    if n < 2 and scheduler.config.get("shift_terminal"):
        raise ValueError("this scheduler stretches its schedule to end at shift_terminal: it needs at least 2 steps")
    defaults_in = np.linspace(1.0, 1.0 / n, n).astype(np.float32)  # what FluxPipeline passes by default
    default = _shifted(scheduler, defaults_in, mu)

    inputs = defaults_in.copy()
    steps: dict[float, int] = {}
    extra: list[float] = []
    for t in sorted({float(x) for x in targets}, reverse=True):
        if t < default[-1]:
            extra.append(t)
            continue
        # A terminal stretch pins the last step at the terminal sigma: only a target equal to it sits there.
        movable = n - 1 if scheduler.config.get("shift_terminal") and n > 1 and t != default[-1] else n
        i = int(np.argmin(np.abs(default[:movable] - t)))
        if i in steps.values():
            raise ValueError(
                f"{n} steps cannot hold the capture sigmas {sorted(targets, reverse=True)} on distinct steps; use more steps"
            )
        steps[t] = i
        if i < n - 1 or not scheduler.config.get("shift_terminal"):
            inputs[i] = _place(scheduler, t, mu, defaults_in[-1])

    final = _shifted(scheduler, inputs, mu)
    if np.any(np.diff(final) >= 0):
        raise ValueError(f"placing {sorted(targets, reverse=True)} into {n} steps breaks the schedule's order; use more steps")
    for t, i in steps.items():
        if abs(final[i] - t) > 1e-6:
            raise AssertionError(f"scheduler maps the placed sigma to {final[i]:.8f}, not {t}")
    return ContractSchedule(
        pipeline_sigmas=tuple(float(x) for x in inputs),
        sigmas=tuple(float(x) for x in final),
        steps=steps,
        extra=tuple(extra),
        default_sigmas=tuple(float(x) for x in default),
    )
