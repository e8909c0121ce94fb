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

A multistep flow scheduler (Wan's UniPCMultistepScheduler with `use_flow_sigmas`) shifts given sigmas elementwise
too, but draws its default inputs from linspace(1, 1/1000, N + 1) and casts its timesteps to integers: the transformer
receives floor(σ·1000). There a target must be a whole number of thousandths, and it is placed so that the floor is
exactly it (`ContractSchedule.sigmas` are then what the transformer receives, timestep / 1000).
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
        sigmas: the N sigmas the transformer will receive, after the scheduler's shift (an integer-timestep
            scheduler's: timestep / num_train_timesteps).
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


_NON_ELEMENTWISE = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


def scheduler_sigmas(scheduler: Any, inputs: Sequence[float]) -> Any:
    """`sigmas=` as this scheduler takes them: a list, or for UniPC (whose flow branch does arithmetic on it
    directly) a float64 array — the same values either way."""
    values = [float(x) for x in inputs]
    return np.asarray(values, dtype=np.float64) if _integer_timesteps(scheduler) else values


def _probe(scheduler: Any, inputs: np.ndarray, mu: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(the sigmas a scheduler derives from `inputs` (float32), the sigmas the transformer then receives: the same,
    or an integer-timestep scheduler's timestep / T), from one copy of the scheduler (the live one is untouched)."""
    probe = copy.deepcopy(scheduler)
    probe.set_timesteps(sigmas=scheduler_sigmas(scheduler, inputs), mu=mu)
    n = len(inputs)
    sigmas = probe.sigmas[:n].double().cpu().numpy()
    if _integer_timesteps(scheduler):
        return sigmas, probe.timesteps[:n].double().cpu().numpy() / _train_steps(scheduler)
    return sigmas, sigmas


def _integer_timesteps(scheduler: Any) -> bool:
    return bool(scheduler.config.get("use_flow_sigmas"))  # UniPC / DPM-Solver: timesteps cast to int64


def _train_steps(scheduler: Any) -> int:
    return int(scheduler.config.get("num_train_timesteps", 1000))


def _shift_param(cfg: Any) -> float:
    return float(cfg.get("flow_shift") if cfg.get("use_flow_sigmas") else cfg.get("shift", 1.0))


def _inverse_shift(scheduler: Any, target: float, mu: float | None) -> float:
    cfg = scheduler.config
    if cfg.get("use_dynamic_shifting"):
        if cfg.get("time_shift_type", "exponential") == "linear":
            return 1.0 / (1.0 + mu * (1.0 / target - 1.0))
        return 1.0 / (1.0 + math.exp(mu) * (1.0 / target - 1.0))
    s = _shift_param(cfg)
    return target / (s - (s - 1.0) * target)


def _shift(scheduler: Any, u: float, mu: float | None) -> float:
    """The scheduler's time shift of one input, before any terminal stretch (the inverse of `_inverse_shift`)."""
    cfg = scheduler.config
    if cfg.get("use_dynamic_shifting"):
        if cfg.get("time_shift_type", "exponential") == "linear":
            return mu / (mu + (1.0 / u - 1.0))
        return math.exp(mu) / (math.exp(mu) + (1.0 / u - 1.0))
    s = _shift_param(cfg)
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
    probe = np.append(cands, last_input) if terminal else cands
    got, received = (x[: len(cands)] for x in _probe(scheduler, probe, mu))
    miss = np.abs(got - float(np.float32(target)))
    if _integer_timesteps(scheduler):  # only inputs whose timestep floors to the target's qualify
        miss[np.abs(received - target) > 1e-9] = np.inf
    return float(cands[int(np.argmin(miss))])


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
    if _integer_timesteps(scheduler):  # UniPC's own default inputs; its timesteps are whole thousandths
        defaults_in = np.linspace(1.0, 1.0 / _train_steps(scheduler), n + 1)[:-1].astype(np.float32)
        steps_of = _train_steps(scheduler)
        off = [t for t in targets if abs(round(t * steps_of) - t * steps_of) > 1e-6]
        if off:
            raise ValueError(f"this scheduler hands the transformer whole timesteps (σ·{steps_of}): capture sigmas "
                             f"must be multiples of {1 / steps_of:g}, got {off}")
    else:
        defaults_in = np.linspace(1.0, 1.0 / n, n).astype(np.float32)  # what FluxPipeline passes by default
    default = _probe(scheduler, defaults_in, mu)[0]

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

    final = _probe(scheduler, inputs, mu)[1]
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
