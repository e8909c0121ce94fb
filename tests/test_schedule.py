"""The timestep contract: the schedule passes through the configured sigmas exactly."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from mmdiff_gen.backbones import contract_schedule
from mmdiff_gen.capture import PAPER_SIGMAS

# FLUX.1-dev's scheduler config (scheduler/scheduler_config.json).
FLUX_SCHEDULER = dict(
    base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, num_train_timesteps=1000,
    shift=3.0, use_dynamic_shifting=True,
)


def _mu(tokens):
    return calculate_shift(tokens, 256, 4096, 0.5, 1.15)


def _live_sigmas(sched, inputs, mu):
    """What FluxPipeline's scheduler really evaluates for `sigmas=inputs`."""
    sched.set_timesteps(sigmas=list(inputs), mu=mu)
    return sched.sigmas[:-1].numpy()


@pytest.mark.parametrize("tokens, nearest", [(1024, [10, 18, 24, 27]), (4096, [13, 21, 25, 27])])
def test_flux_default_schedule_misses_the_paper_sigmas(tokens, nearest):
    # The problem the contract solves: the default 28-step schedule only comes near.
    sched = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    plan = contract_schedule(sched, 28, PAPER_SIGMAS, _mu(tokens))
    default = np.array(plan.default_sigmas)
    got = [int(np.argmin(np.abs(default - t))) for t in PAPER_SIGMAS]
    assert got == nearest
    assert min(default) > 0.05  # t = 0.001 is never on the schedule
    assert all(abs(default[i] - t) > 4e-3 for i, t in zip(got, PAPER_SIGMAS))


@pytest.mark.parametrize("tokens", [1024, 4096])
@pytest.mark.parametrize("steps", [20, 28, 50])
def test_contract_places_targets_exactly(tokens, steps):
    sched = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    plan = contract_schedule(sched, steps, PAPER_SIGMAS, _mu(tokens))
    live = _live_sigmas(FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), plan.pipeline_sigmas, _mu(tokens))
    for t, i in plan.steps.items():
        assert live[i] == np.float32(t)  # bit-exact in the scheduler's float32
    assert plan.extra == (0.001,) and plan.extra_forwards == 1
    assert set(plan.steps) == {0.78, 0.52, 0.26}
    untouched = [i for i in range(steps) if i not in plan.steps.values()]
    np.testing.assert_array_equal(live[untouched], np.array(plan.default_sigmas, dtype=np.float32)[untouched])
    assert np.all(np.diff(live) < 0)


def test_contract_leaves_the_live_scheduler_alone():
    sched = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    sched.set_timesteps(sigmas=[1.0, 0.5], mu=0.7)
    before = sched.sigmas.clone()
    contract_schedule(sched, 28, PAPER_SIGMAS, _mu(1024))
    assert torch.equal(sched.sigmas, before)


def test_contract_static_shift_and_errors():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False)
    plan = contract_schedule(sched, 12, (0.9, 0.5), None)
    live = _live_sigmas(FlowMatchEulerDiscreteScheduler(shift=3.0), plan.pipeline_sigmas, None)
    assert [live[i] for i in plan.steps.values()] == [np.float32(0.9), np.float32(0.5)]
    assert plan.extra == ()
    with pytest.raises(ValueError, match="more steps"):
        contract_schedule(sched, 2, (0.99, 0.98), None)
    with pytest.raises(ValueError, match="elementwise"):
        contract_schedule(FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True), 28, PAPER_SIGMAS, None)


# Qwen-Image's scheduler config (scheduler/scheduler_config.json): a terminal stretch to 0.02.
QWEN_SCHEDULER = dict(
    base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, num_train_timesteps=1000,
    shift=1.0, shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True,
)


@pytest.mark.parametrize("steps, tokens", [(50, 4096), (20, 1024), (8, 6889)])
def test_contract_with_a_terminal_stretch(steps, tokens):
    """The stretch depends on the schedule's last sigma: the last step is never moved, every other target lands
    (to float32 rounding), and 0.001 (below the terminal 0.02) is the one extra forward."""
    mu = calculate_shift(tokens, 256, 8192, 0.5, 0.9)
    plan = contract_schedule(FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER), steps, PAPER_SIGMAS, mu)
    live = _live_sigmas(FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER), plan.pipeline_sigmas, mu)
    assert plan.extra == (0.001,) and abs(live[-1] - 0.02) < 1e-6 and abs(plan.default_sigmas[-1] - 0.02) < 1e-6
    # The stretch runs in float32 after the shift: within an ulp or two of the target (the contract's 1e-6).
    assert np.allclose([live[i] for i in plan.steps.values()], list(plan.steps), atol=1e-6, rtol=0)
    assert set(plan.steps) == {0.78, 0.52, 0.26} and steps - 1 not in plan.steps.values()
    assert np.all(np.diff(live) < 0)


def test_a_terminal_stretch_needs_two_steps():
    with pytest.raises(ValueError, match="at least 2 steps"):
        contract_schedule(FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER), 1, (0.5,), 0.5)
