"""Capture inside the generation pass: bit-identical images, exact features, the contract's sigmas, CFG."""

import numpy as np
import pytest
import torch

from mmdiff_gen.capture import Capture, CaptureSpec, generate, plan_schedule
from mmdiff_gen.capture._noise import generators_for

PROMPTS = ["a red circle on the left", "a small blue star"]
SEEDS = [11, 12]
KW = dict(height=64, width=64, num_inference_steps=10, max_sequence_length=32)


def _plain(tiny, spec, **extra):
    """A plain FluxPipeline call on the same schedule and seeds, no mmdiff_gen hooks."""
    plan = plan_schedule(tiny, spec, KW["num_inference_steps"], KW["height"], KW["width"])
    return tiny.pipe(
        prompt=PROMPTS, generator=generators_for(SEEDS), sigmas=list(plan.pipeline_sigmas), output_type="np", **KW,
        **extra,
    ).images


@pytest.mark.parametrize(
    "spec",
    [
        CaptureSpec(),
        CaptureSpec(concepts=("object", "background", "edges"), cross_attention=True, layers=(0, 3)),
    ],
    ids=["features", "features+concepts+cross"],
)
def test_images_bit_identical_to_plain_pipeline(tiny, spec):
    ours = generate(tiny, PROMPTS, spec, seeds=SEEDS, output_type="np", **KW)
    assert np.array_equal(ours.images, _plain(tiny, spec))


def test_images_bit_identical_with_true_cfg(tiny):
    spec = CaptureSpec(concepts=("object", "background"))
    cfg = dict(true_cfg_scale=4.0, negative_prompt="")
    ours = generate(tiny, PROMPTS, spec, seeds=SEEDS, output_type="np", **cfg, **KW)
    assert np.array_equal(ours.images, _plain(tiny, spec, **cfg))


@pytest.mark.parametrize("store", ["float32", "bfloat16"])
def test_features_are_the_block_outputs_at_the_configured_sigmas(tiny, recorder, store):
    spec = CaptureSpec(layers=(1, 3), store_dtype=store)
    rec = recorder(tiny.transformer, tiny.feature_blocks)
    gen = generate(tiny, PROMPTS, spec, seeds=SEEDS, **KW)
    cap = gen.capture
    b, l, t, n, c = cap.features.shape
    assert (b, l, t, n, c) == (2, 2, 4, 64, tiny.feature_dim)
    assert cap.features.dtype == spec.torch_store_dtype
    # The contract: received sigmas equal the configured ones (float32 round-off only) ...
    assert torch.allclose(cap.sigmas, torch.tensor([spec.sigmas] * 2), atol=1e-6, rtol=0)
    # ... and the transformer ran N times plus one extra forward for 0.001.
    assert len(rec.timesteps) == KW["num_inference_steps"] + 1
    for j, target in enumerate(spec.sigmas):
        call = next(k for k, s in enumerate(rec.timesteps) if abs(float(s[0]) - target) < 1e-6)
        for slot, layer in enumerate(cap.layers):
            ref = rec.outputs[call][layer].to(spec.torch_store_dtype)
            assert torch.equal(cap.features[:, slot, j], ref)


def test_capture_refuses_a_schedule_that_misses_the_sigmas(tiny):
    # Plain default schedule: the sampler never lands on 0.78 / 0.52 / 0.26 / 0.001.
    spec = CaptureSpec()
    with Capture(tiny, spec, batch_size=2, height=64, width=64) as cap:
        tiny.pipe(prompt=PROMPTS, generator=generators_for(SEEDS), **KW)
    with pytest.raises(RuntimeError, match="never evaluated at sigma"):
        cap.result()


def test_true_cfg_captures_only_the_conditional_call(tiny, recorder):
    spec = CaptureSpec(layers=(2,), store_dtype="float32", sigmas=(0.78, 0.52))
    rec = recorder(tiny.transformer, tiny.feature_blocks)
    gen = generate(tiny, PROMPTS, spec, seeds=SEEDS, true_cfg_scale=5.0, negative_prompt="", **KW)
    assert len(rec.timesteps) == 2 * KW["num_inference_steps"]  # no extra forward: both targets on schedule
    for j, target in enumerate(spec.sigmas):
        calls = [k for k, s in enumerate(rec.timesteps) if abs(float(s[0]) - target) < 1e-6]
        assert len(calls) == 2  # cond, then uncond
        cond, uncond = (rec.outputs[k][2] for k in calls)
        assert torch.equal(gen.capture.features[:, 0, j], cond)
        assert not torch.allclose(cond, uncond)


def test_store_device_and_hooks_installed_once(tiny):
    """Hooks are installed once per backbone (before any compilation) and only switched afterwards."""
    def count():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tiny.transformer.modules())

    spec = CaptureSpec(store_device="cpu", concepts=("object", "background"))
    generate(tiny, PROMPTS[:1], spec, seeds=SEEDS[:1], **KW)
    before = count()
    gen = generate(tiny, PROMPTS[:1], CaptureSpec(store_device="cpu", cross_attention=True), seeds=SEEDS[:1], **KW)
    assert gen.capture.features.device.type == "cpu" and count() == before > 0


def test_generation_is_seeded_per_sample(tiny):
    spec = CaptureSpec(sigmas=(0.5,))
    both = generate(tiny, PROMPTS, spec, seeds=SEEDS, output_type="np", **KW)
    second = generate(tiny, PROMPTS[1:], spec, seeds=SEEDS[1:], output_type="np", **KW)
    # Same prompt and seed give the same image whatever else is in the batch (up to GEMM round-off).
    assert np.abs(both.images[1] - second.images[0]).max() < 1e-4
    assert torch.allclose(both.capture.features[1].float(), second.capture.features[0].float(), atol=5e-2)


def test_pinned_pool_reuses_a_buffer_only_once_nothing_refers_to_it(monkeypatch):
    from mmdiff_gen.capture._hooks import PinnedPool

    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **k: real_empty(*a, **k))  # no CUDA here
    pool = PinnedPool(keep=2)
    first = pool.get((2, 3), torch.float32)
    ptr = first.data_ptr()
    assert pool.get((2, 3), torch.float32).data_ptr() != ptr  # the first result is alive: never handed out again
    row = first[0]  # a caller keeps part of it
    del first
    assert pool.get((2, 3), torch.float32).data_ptr() != ptr
    del row
    assert pool.get((2, 3), torch.float32).data_ptr() == ptr  # nothing refers to it any more: reused


def test_joint_block_features_are_the_double_stream_image_outputs(tiny, recorder):
    # The paper's Table 5 first row reads FLUX's double-stream blocks: `blocks="joint"` indexes those.
    spec = CaptureSpec(layers=(0, 1), blocks="joint", sigmas=(0.52, 0.001), store_dtype="float32")
    rec = recorder(tiny.transformer, tiny.joint_blocks)
    cap = generate(tiny, PROMPTS, spec, seeds=SEEDS, **KW).capture
    assert cap.layers == (0, 1) and cap.features.shape[:3] == (2, 2, 2)
    for j, target in enumerate(spec.sigmas):
        call = next(k for k, s in enumerate(rec.timesteps) if abs(float(s[0]) - target) < 1e-6)
        for slot in range(2):
            assert torch.equal(cap.features[:, slot, j], rec.outputs[call][slot])
    assert tiny.default_layers(blocks="joint") == (0, 1)  # two double-stream blocks: both
    with pytest.raises(ValueError, match="out of range"):
        generate(tiny, PROMPTS, CaptureSpec(layers=(len(tiny.joint_blocks),), blocks="joint"), seeds=SEEDS, **KW)
    with pytest.raises(ValueError, match="blocks must be one of"):
        CaptureSpec(blocks="double")


def test_features_leaving_a_gpu_are_copied_as_contiguous_blocks(tiny, monkeypatch):
    """Staged capture (a GPU's features into pinned host memory, store_device="cpu") copies each layer × sigma as one
    contiguous block from a contiguous source, non-blocking: a strided destination or source goes through a pageable
    temporary and blocks the host. Observed on the CPU with staging forced (pinning itself needs CUDA)."""
    from mmdiff_gen.capture._hooks import PinnedPool

    spec = CaptureSpec(store_device="cpu")
    ref = generate(tiny, PROMPTS, spec, seeds=SEEDS, **KW).capture.features.clone()
    copies = []
    real = torch.Tensor.copy_

    def spy(dst, src, non_blocking=False):
        if non_blocking:
            copies.append((dst.is_contiguous(), src.is_contiguous()))
        return real(dst, src, non_blocking=non_blocking)

    monkeypatch.setattr(Capture, "_staged", staticmethod(lambda store, compute: True))
    monkeypatch.setattr(PinnedPool, "get", lambda self, shape, dtype: torch.empty(shape, dtype=dtype))
    monkeypatch.setattr(torch.Tensor, "copy_", spy)
    features = generate(tiny, PROMPTS, spec, seeds=SEEDS, **KW).capture.features
    monkeypatch.undo()
    assert len(PROMPTS) > 1 and len(copies) == features.shape[1] * features.shape[2]  # one per layer × sigma
    assert all(dst and src for dst, src in copies), copies
    assert features.shape == ref.shape and torch.equal(features, ref)


def test_the_text_mask_reaches_armed_calls_already_in_place(tiny, monkeypatch):
    """The cross-attention baseline's prompt mask is moved to the device and cast once, when the capture starts:
    inside an armed call `.to` is a no-op (moved there, the host would wait on the GPU at every concept layer)."""
    from mmdiff_gen.capture import _hooks

    seen = []
    real = _hooks.cross_attention_map

    def spy(q, tk, image_keys, mask, key_mask=None):
        seen.append(mask is None or mask.to(q.device, torch.float32) is mask)
        return real(q, tk, image_keys, mask, key_mask)

    monkeypatch.setattr(_hooks, "cross_attention_map", spy)
    generate(tiny, PROMPTS, CaptureSpec(concepts=("object",), cross_attention=True), seeds=SEEDS, **KW)
    assert seen and all(seen), seen
