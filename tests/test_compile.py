"""Capture in a compiled transformer (whole and regional), fullgraph, no recompiles per step, same results.

The aot_eager backend runs dynamo's tracing, guards and AOT graph capture without codegen: what decides
whether hooks fire and how often graphs are rebuilt, in seconds on this CPU. `bench/gpu_check.py` and
`bench/compile_capture.py` run inductor.
"""

import numpy as np
import pytest
import torch
import torch._dynamo

from mmdiff_gen.backbones import load_backbone, wrap_pipeline
from mmdiff_gen.backbones.tiny import build_tiny_flux, build_tiny_sd3
from mmdiff_gen.capture import CaptureSpec, compile_backbone, compiled_graphs, extract, generate
from mmdiff_gen.capture._noise import generators_for

PROMPTS = ["a red circle on the left", "a small blue star"]
SEEDS = [3, 4]
KW = dict(height=64, width=64, num_inference_steps=6, max_sequence_length=32, output_type="np")
SPEC = CaptureSpec(concepts=("object", "background"), cross_attention=True, layers=(0, 3),
                   text_attention_layers=(1, 3), store_dtype="float32")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _same(a, b):
    for name in ("features", "concept_maps", "cross_attention", "text_attention", "sigmas"):
        x, y = getattr(a, name), getattr(b, name)
        assert x is not None and torch.allclose(x, y, atol=1e-5, rtol=1e-5), name


IMAGES = torch.linspace(0, 1, 2 * 3 * 64 * 64).reshape(2, 3, 64, 64)


@pytest.mark.parametrize("mode", ["transformer", "blocks"])
def test_compiled_capture_equals_eager_without_recompiles_per_step(mode):
    bb = wrap_pipeline(build_tiny_flux(seed=0), name="tiny")
    cfg = dict(true_cfg_scale=3.0, negative_prompt="")
    eager = generate(bb, PROMPTS, SPEC, seeds=SEEDS, **KW)
    eager_cfg = generate(bb, PROMPTS, SPEC, seeds=SEEDS, **cfg, **KW)
    eager_real = extract(bb, IMAGES, SPEC, captions=PROMPTS)
    compile_backbone(bb, mode, backend="aot_eager")  # fullgraph=True: an armed call must not break the graph
    before = compiled_graphs()  # a process-wide count: other tests' graphs are in it
    first = generate(bb, PROMPTS, SPEC, seeds=SEEDS, **KW)
    warm = compiled_graphs()
    again = generate(bb, PROMPTS, SPEC, seeds=SEEDS, **KW)
    assert compiled_graphs() == warm  # the same run again builds nothing: no guard on the step or target
    for ours in (first, again):
        assert np.array_equal(ours.images, eager.images)
        _same(ours.capture, eager.capture)
    _same(generate(bb, PROMPTS, SPEC, seeds=SEEDS, **cfg, **KW).capture, eager_cfg.capture)
    _same(extract(bb, IMAGES, SPEC, captions=PROMPTS), eager_real)
    # Armed / unarmed × generation, true CFG, the real-image batch: a handful of graphs, not one per step.
    built = compiled_graphs() - before
    assert built <= (8 if mode == "transformer" else 16), built
    # The images equal a plain call of the same compiled transformer (hooks present, unarmed).
    plain = bb.pipe(prompt=PROMPTS, generator=generators_for(SEEDS), sigmas=list(first.schedule.pipeline_sigmas),
                    **KW).images
    assert np.array_equal(plain, first.images)


def _compiled_matches_eager(bb, spec, mode, **kw):
    eager = generate(bb, PROMPTS, spec, seeds=SEEDS, **kw)
    compile_backbone(bb, mode, backend="aot_eager")
    ours = generate(bb, PROMPTS, spec, seeds=SEEDS, **kw)
    assert np.array_equal(ours.images, eager.images)
    assert torch.allclose(ours.capture.features, eager.capture.features, atol=1e-5)
    assert torch.allclose(ours.capture.concept_maps, eager.capture.concept_maps, atol=1e-5)


def test_compiled_sd3_with_cfg_in_batch():
    bb = wrap_pipeline(build_tiny_sd3(seed=0), name="tiny-sd3")
    spec = CaptureSpec(concepts=("object", "background"), layers=(0, 1), store_dtype="float32")
    _compiled_matches_eager(bb, spec, "transformer", **dict(KW, guidance_scale=4.0))


def test_toy_backbone_compiled_by_blocks():
    toy = load_backbone("toy", dtype=torch.float32, device="cpu")
    spec = CaptureSpec.for_tasks(["seg", "depth"], store_dtype="float32")
    _compiled_matches_eager(toy, spec, "blocks", height=64, width=64, num_inference_steps=8, output_type="np")


def test_compiled_before_the_hooks_existed_is_refused_in_one_line():
    bb = wrap_pipeline(build_tiny_flux(seed=0), name="tiny")
    bb.transformer.compile(backend="aot_eager")  # compiled and run with no capture hooks in it
    bb.pipe(prompt=PROMPTS[:1], **KW)
    with pytest.raises(RuntimeError, match="compiled .* before .*prepare"):
        generate(bb, PROMPTS[:1], SPEC, seeds=SEEDS[:1], **KW)


@pytest.mark.parametrize("offload, storage", [("model", "full"), ("group", "full"), ("none", "fp8")])
def test_compiled_under_offload_or_fp8_equals_eager(offload, storage):
    """Their hooks move or cast weights in `torch.compiler.disable`d functions: fullgraph would refuse them, so
    compile_backbone breaks the graph there (on the CPU through the same diffusers / accelerate calls)."""
    from mmdiff_gen.backbones.runtime import apply_runtime

    pipe = build_tiny_flux(seed=0)
    apply_runtime(pipe, offload=offload, storage=storage, dtype=torch.float32, device="cpu")
    bb = wrap_pipeline(pipe, name="tiny")
    eager = generate(bb, PROMPTS, SPEC, seeds=SEEDS, **KW)
    compile_backbone(bb, "blocks", backend="aot_eager")
    ours = generate(bb, PROMPTS, SPEC, seeds=SEEDS, **KW)
    assert np.array_equal(ours.images, eager.images)
    _same(ours.capture, eager.capture)


def test_compile_under_sequential_offload_is_refused_in_one_line():
    from typer.testing import CliRunner

    from mmdiff_gen.backbones.runtime import apply_runtime
    from mmdiff_gen.cli import app

    pipe = build_tiny_flux(seed=0)
    apply_runtime(pipe, offload="sequential", storage="full", dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="sequential offload .*: use --offload group or model"):
        compile_backbone(wrap_pipeline(pipe, name="tiny"), "blocks", backend="aot_eager")
    res = CliRunner().invoke(app, ["generate", "--prompts", "p.txt", "--out", "o", "--compile", "blocks",
                                   "--offload", "sequential"])  # refused before the prompts are read
    assert res.exit_code == 2 and "sequential offload" in res.output, res.output
