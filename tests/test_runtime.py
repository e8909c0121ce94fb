"""Offload and weight storage under capture: device and dtype from what diffusers runs, inputs on the execution
device, weights called only while they are on it, and one-line refusals.

The offload modes need a GPU through `load_backbone`; here they run on the CPU through the same diffusers and
accelerate calls (`apply_runtime`, or accelerate's `cpu_offload` where diffusers insists on "cpu:0"), with spies
that record every layer called while its weights are offloaded: what would read CPU (or meta) weights on a GPU.
"""

import json

import pytest
import torch
from typer.testing import CliRunner

from mmdiff_gen.backbones import load_backbone, wrap_pipeline
from mmdiff_gen.backbones.runtime import OFFLOAD_MODES, STORAGE_MODES, apply_runtime
from mmdiff_gen.backbones.tiny import build_tiny_flux
from mmdiff_gen.capture import CaptureSpec, extract, generate
from mmdiff_gen.tasks import get as get_task
from mmdiff_gen.cli import app

run = CliRunner().invoke
PROMPTS = ["a red circle on the left", "a small blue star"]
SEEDS = [0, 1]
KW = dict(height=64, width=64, num_inference_steps=6, max_sequence_length=32, output_type="np")
# Concepts, cross-attention and a text-attention tap: every code path that calls the transformer's layers itself.
SPEC = CaptureSpec(concepts=("object", "background"), cross_attention=True, layers=(0, 3), text_attention_layers=(1,),
                   store_dtype="float32")
IMAGES = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
MAPS = ("features", "concept_maps", "cross_attention", "text_attention", "sigmas")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def reference():
    """Full-precision, resident tiny FLUX: generation and real-image results to compare against."""
    bb = wrap_pipeline(build_tiny_flux(seed=0), name="tiny")
    return generate(bb, PROMPTS, SPEC, seeds=SEEDS, **KW), extract(bb, IMAGES, SPEC, captions=PROMPTS)


def _same(ours, ref, exact_images=True):
    gen, real = ours
    assert torch.equal(gen.capture.sigmas, ref[0].capture.sigmas)
    if exact_images:
        assert abs(gen.images - ref[0].images).max() == 0
    for name in MAPS:
        assert torch.allclose(getattr(gen.capture, name), getattr(ref[0].capture, name), atol=1e-6), name
        assert torch.allclose(getattr(real, name), getattr(ref[1], name), atol=1e-6), name


def _run(bb):
    return generate(bb, PROMPTS, SPEC, seeds=SEEDS, **KW), extract(bb, IMAGES, SPEC, captions=PROMPTS)


# --- storage: fp8 layerwise casting and torchao int8 ------------------------------------------------------------------

STORED_SPEC = CaptureSpec(concepts=get_task("seg").concepts, store_dtype="float32")


@pytest.fixture(scope="module")
def stored_run():
    """(model, storage) → (backbone, generation capture, real-image capture); full-precision runs are kept."""
    full = {}

    def run(model: str, storage: str):
        if storage == "full" and model in full:
            return full[model]
        bb = load_backbone(model, dtype=torch.float32, device="cpu", storage=storage)
        out = (bb, generate(bb, PROMPTS, STORED_SPEC, seeds=SEEDS, **dict(KW, num_inference_steps=8)).capture,
               extract(bb, IMAGES, STORED_SPEC, captions=PROMPTS))
        if storage == "full":
            full[model] = out
        return out
    return run


@pytest.mark.parametrize("model, storage, gen_tol, real_tol", [
    # Measured (rel. L2 of the features, 8 steps / real images): toy fp8 0.034 / 0.019, int8 0.007 / 0.004;
    # tiny-random fp8 0.026 / 0.027, int8 0.005 / 0.004.
    ("toy", "fp8", 0.08, 0.04), ("toy", "int8", 0.02, 0.01),
    ("tiny-random", "fp8", 0.06, 0.06), ("tiny-random", "int8", 0.02, 0.01),
])
def test_stored_weights_compute_in_the_load_dtype_and_capture_close_to_full(stored_run, model, storage, gen_tol,
                                                                            real_tol):
    """fp8 (diffusers' layerwise casting) and int8 (torchao: TorchAoConfig while a folder loads, quantize_ for the
    in-memory tiny-random) keep the transformer computing in float32; capture lands on the planned sigmas."""
    spec = STORED_SPEC
    (bb0, gen0, real0), (bb, gen, real) = stored_run(model, "full"), stored_run(model, storage)
    for b, s in ((bb0, "full"), (bb, storage)):
        assert b.runtime == {"offload": "none", "storage": s}
        assert b.dtype == torch.float32  # the compute dtype, never fp8 / int8 storage
    w = bb.transformer.transformer_blocks[0].attn.to_q.weight
    assert (w.dtype == torch.float8_e4m3fn) if storage == "fp8" else type(w).__name__ == "Int8Tensor"
    targets = torch.tensor([list(spec.sigmas)] * 2)
    assert torch.allclose(gen.sigmas, targets, rtol=2e-7, atol=0)  # the targets, to float32 rounding
    assert torch.equal(gen.sigmas, gen0.sigmas)
    assert _rel(gen.features, gen0.features) < gen_tol and _rel(real.features, real0.features) < real_tol
    assert (gen.concept_maps - gen0.concept_maps).abs().max() < 0.2
    assert (real.concept_maps - real0.concept_maps).abs().max() < 0.1


def test_a_pipeline_stored_by_hand_is_described_and_captured():
    """wrap_pipeline reads how the transformer is held (dataset.json records it): fp8 casting, torchao tensors."""
    pipe = build_tiny_flux(seed=0)
    assert wrap_pipeline(pipe).runtime == {"offload": "none", "storage": "full"}
    pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    bb = wrap_pipeline(pipe)
    assert bb.runtime == {"offload": "none", "storage": "fp8"} and bb.dtype == torch.float32
    gen = generate(bb, PROMPTS, SPEC, seeds=SEEDS, **KW)
    assert gen.capture.concept_maps is not None and gen.capture.sigmas[0].tolist() == pytest.approx(SPEC.sigmas)

    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    pipe = build_tiny_flux(seed=0)
    quantize_(pipe.transformer, Int8WeightOnlyConfig())
    assert wrap_pipeline(pipe).runtime == {"offload": "none", "storage": "int8"}


# --- offload: execution device, and weights only used while on it ------------------------------------------------

class _Residency:
    """Spies on accelerate's model offload (CpuOffload hooks) or diffusers' group offload (ModuleGroup) and records
    every transformer layer with weights that runs while its weights are offloaded."""

    def __init__(self, monkeypatch, transformer):
        import accelerate.hooks as ah
        from diffusers.hooks import group_offloading as go

        self.resident: dict[int, bool] = {}
        self.bad: list[str] = []
        spy = self

        def patch(cls, name, value):
            orig = getattr(cls, name)

            def wrapper(self, module=None, *args, **kwargs):
                spy.resident[id(self if cls is go.ModuleGroup else module)] = value
                return orig(self, *args, **kwargs) if cls is go.ModuleGroup else orig(self, module, *args, **kwargs)
            monkeypatch.setattr(cls, name, wrapper)

        patch(ah.CpuOffload, "pre_forward", True)
        patch(ah.CpuOffload, "init_hook", False)  # also what offload() calls
        patch(go.ModuleGroup, "onload_", True)
        patch(go.ModuleGroup, "offload_", False)
        owner = _owners(transformer)
        for name, m in transformer.named_modules():
            if list(m.parameters(recurse=False)) and owner[m] is not None:
                m.register_forward_pre_hook(self._check(name, owner[m]))

    def _check(self, name, key):
        def pre(_module, _args):
            if not self.resident.get(key, False):
                self.bad.append(name)
        return pre


def _owners(transformer) -> dict:
    """Module → the key whose residency decides whether its weights are on the device: None where its own group
    offload hook onloads it in its forward, else the group that holds it, else the whole transformer (model
    offload, or the top-level group of group offload)."""
    def group_hook(m):
        reg = getattr(m, "_diffusers_hook", None)
        return reg.get_hook("group_offloading") if reg is not None else None

    top = group_hook(transformer)
    owner = {m: id(top.group) if top is not None else id(transformer) for m in transformer.modules()}
    hooked = [m for m in transformer.modules() if m is not transformer and group_hook(m) is not None]
    for m in hooked:
        for x in (x for g in group_hook(m).group.modules for x in g.modules()):
            owner[x] = id(group_hook(m).group)
    for m in hooked:  # leaf level: each layer (and each norm holding bare parameters) onloads itself
        owner[m] = None
    return owner


def test_model_offload_runs_the_transformer_layers_only_while_it_is_on_the_device(monkeypatch, reference):
    """accelerate moves a component in for its forward only: the concept tokens (context embedder, outside any
    forward) onload it first (the concept stream's time embedding is computed inside the forward), and the
    extra forward after the pipeline returned frees it again, so the next batch's text encoders find room; the
    concept tokens put it back too, so T5 never shares the device with it (the first batch included)."""
    pipe = build_tiny_flux(seed=0)
    apply_runtime(pipe, offload="model", storage="full", dtype=torch.float32, device="cpu")  # diffusers allows cpu
    spy = _Residency(monkeypatch, pipe.transformer)
    t5_beside = []
    pipe.text_encoder_2.register_forward_pre_hook(lambda *_: t5_beside.append(spy.resident.get(id(pipe.transformer))))
    bb = wrap_pipeline(pipe)
    assert bb.runtime["offload"] == "model" and bb.device.type == "cpu"
    ours = _run(bb)
    assert spy.bad == [], sorted(set(spy.bad))
    assert len(t5_beside) >= 2 and not any(t5_beside), t5_beside  # concept words, then the prompts
    _same(ours, reference)
    generate(bb, PROMPTS, SPEC, seeds=SEEDS, **KW)
    assert spy.resident[id(pipe.transformer)] is False  # freed after the extra forward at sigma 0.001


def test_sequential_offload_puts_inputs_on_the_execution_device(reference):
    """Weights on "meta" between calls, execution device cpu: T5's inputs, the VAE's images and every transformer
    input go to the execution device, not to a parameter's device. (diffusers' enable_sequential_cpu_offload names
    the CPU "cpu:0", which accelerate's CPU path mishandles; its cpu_offload with "cpu" is the same hooks.)"""
    from accelerate import cpu_offload

    pipe = build_tiny_flux(seed=0)
    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            cpu_offload(comp, torch.device("cpu"), offload_buffers=len(comp._parameters) > 0)
    bb = wrap_pipeline(pipe)
    assert next(bb.transformer.parameters()).device.type == "meta" and bb.device == torch.device("cpu")
    assert bb.runtime["offload"] == "sequential" and bb.dtype == torch.float32
    seen = []
    h = bb.transformer.register_forward_pre_hook(
        lambda _m, _a, kw: seen.extend(v.device.type for v in kw.values() if isinstance(v, torch.Tensor)),
        with_kwargs=True)
    try:
        _same(_run(bb), reference)
    finally:
        h.remove()
    assert seen and set(seen) == {"cpu"}


def test_leaf_group_offload_onloads_every_layer_capture_calls(monkeypatch, reference):
    """--offload group is diffusers' leaf-level group offload: each layer onloads itself, so the concept stream and
    the attention taps, which call a block's layers after the block returned, read onloaded weights."""
    pipe = build_tiny_flux(seed=0)
    apply_runtime(pipe, offload="group", storage="full", dtype=torch.float32, device="cpu")
    spy = _Residency(monkeypatch, pipe.transformer)
    bb = wrap_pipeline(pipe)
    assert bb.runtime == {"offload": "group", "storage": "full"} and bb.device == torch.device("cpu")
    ours = _run(bb)
    assert spy.bad == [], sorted(set(spy.bad))
    _same(ours, reference)


def test_block_level_group_offload_is_refused_for_the_concept_stream(monkeypatch, reference):
    """Block-level groups go back to the CPU as the block returns, before capture reuses the block's layers (the
    spy shows it); capture refuses it in one line unless only block outputs are read."""
    pipe = build_tiny_flux(seed=0)
    pipe.transformer.enable_group_offload(onload_device=torch.device("cpu"), offload_type="block_level",
                                          num_blocks_per_group=1)
    spy = _Residency(monkeypatch, pipe.transformer)
    bb = wrap_pipeline(pipe)
    with pytest.raises(ValueError, match="block-level group offload .* use offload_type='leaf_level'"):
        generate(bb, PROMPTS, SPEC, seeds=SEEDS, **KW)
    features_only = CaptureSpec(layers=(0, 3), store_dtype="float32")
    gen = generate(bb, PROMPTS, features_only, seeds=SEEDS, **KW)
    assert spy.bad == []
    assert torch.allclose(gen.capture.features, reference[0].capture.features, atol=1e-6)


def test_fp8_storage_with_offload_captures_the_same_as_fp8_resident():
    runs = []
    for offload in ("none", "model", "group"):
        pipe = build_tiny_flux(seed=0)
        apply_runtime(pipe, offload=offload, storage="fp8", dtype=torch.float32, device="cpu")
        bb = wrap_pipeline(pipe)
        assert bb.runtime == {"offload": offload, "storage": "fp8"} and bb.dtype == torch.float32
        runs.append(generate(bb, PROMPTS, SPEC, seeds=SEEDS, **KW).capture)
    for other in runs[1:]:
        assert torch.allclose(other.features, runs[0].features, atol=1e-6)


# --- refusals -------------------------------------------------------------------------------------------------------

def test_load_backbone_refuses_offload_on_the_cpu_and_unknown_modes():
    with pytest.raises(ValueError, match="--offload model needs a GPU"):
        load_backbone("tiny-random", dtype=torch.float32, device="cpu", offload="model")
    with pytest.raises(ValueError, match="unknown offload 'disk'"):
        load_backbone("tiny-random", dtype=torch.float32, device="cpu", offload="disk")
    with pytest.raises(ValueError, match="unknown storage 'int4'"):
        load_backbone("tiny-random", dtype=torch.float32, device="cpu", storage="int4")


def test_int8_without_torchao_says_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(ImportError, match="pip install torchao"):
        load_backbone("tiny-random", dtype=torch.float32, device="cpu", storage="int8")


def test_cli_names_the_option_and_refuses_before_loading(tmp_path):
    import mmdiff_gen.cli._options as opts

    assert (opts.OFFLOAD_MODES, opts.STORAGE_MODES) == (OFFLOAD_MODES, STORAGE_MODES)  # --help loads no torch
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    base = ["--prompts", str(prompts), "--out", str(tmp_path / "o"), "--model", "tiny-random", "--device", "cpu",
            "--dtype", "float32", "--size", "64", "--steps", "4"]
    for command in ("generate", "capture"):
        res = run(app, [command, *base, "--offload", "disk"])
        assert res.exit_code == 2 and "'--offload'" in res.output and "disk" in res.output, res.output
        res = run(app, [command, *base, "--storage", "int4"])
        assert res.exit_code == 2 and "'--storage'" in res.output, res.output
        res = run(app, [command, *base, "--offload", "model"])
        assert res.exit_code == 2 and "--offload model needs a GPU" in res.output, res.output
    for command in (["extract", "--data", "folder:/nowhere", "--out", str(tmp_path / "c")],
                    ["probe-layers", "--data", "folder:/nowhere"]):
        res = run(app, [*command, "--device", "cpu", "--offload", "group"])
        assert res.exit_code == 2 and "--offload group needs a GPU" in res.output, res.output
    assert not (tmp_path / "o").exists()
    # float16 FLUX is refused whatever the storage (its activations overflow float16).
    res = run(app, ["capture", "--prompts", str(prompts), "--out", str(tmp_path / "o"), "--model", "tiny-random",
                    "--device", "cpu", "--dtype", "float16", "--size", "64", "--steps", "4", "--storage", "fp8"])
    assert res.exit_code == 1 and "float16" in res.output and "bfloat16 or float32" in res.output, res.output


def test_cli_generate_records_the_storage_in_dataset_json(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle on the left\n")
    res = run(app, ["generate", "--prompts", str(prompts), "--out", str(tmp_path / "ds"), "--model", "toy",
                    "--tasks", "seg", "--steps", "4", "--device", "cpu", "--dtype", "float32", "--storage", "int8"])
    assert res.exit_code == 0, res.output
    info = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert info["runtime"] == {"offload": "none", "storage": "int8"}
