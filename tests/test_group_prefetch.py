"""--offload group on a GPU: diffusers' leaf-level group offload with a CUDA stream, emulated on the CPU.

diffusers (0.42, hooks/group_offloading.py) records the order the transformer's layers run in during its first
forward and links each layer's group to the next one: a layer's hook prefetches its successor on the side stream,
and a layer nobody prefetched is loaded synchronously ("fallback"). Capture calls a block's layers again after the
block returned (concept stream, cross-attention and text-attention taps) and encodes the concept tokens before the
first forward; here every transformer call — armed or not, the order recorded in an unarmed call (`generate`) or in
an armed one (`extract` first) — loads each layer exactly once, by the chain, never by the fallback, and images and
features are bit-identical to a resident transformer.

The emulation runs diffusers' own hooks with the config `enable_group_offload(use_stream=True)` builds on CUDA,
minus what a CPU-only torch lacks: a stream (a stand-in whose synchronize does nothing), pinned memory and
record_stream. Residency is tracked per group (onload_ / offload_) and stands in for the weights' device in
diffusers' fallback test, so its hooks take the branches they would take on a GPU.
"""

import contextlib

import numpy as np
import pytest
import torch
from diffusers.hooks import group_offloading as go

from _families import FAMILIES
from mmdiff_gen.backbones import wrap_pipeline
from mmdiff_gen.capture import CaptureSpec, extract, generate

PROMPTS = ["a red circle on the left", "a small blue star"]
SEEDS = [0, 1]
KW = dict(height=64, width=64, num_inference_steps=6, max_sequence_length=16, output_type="np")
# Concepts through the last joint blocks, cross-attention, a text-attention tap on the last attention block (FLUX.1:
# a single-stream block): every layer capture calls itself, in every family (with its own guidance).
def _spec(bb) -> CaptureSpec:
    return CaptureSpec(concepts=("object", "background"), cross_attention=True, layers=(0, 3),
                       text_attention_layers=(len(bb.attention_blocks) - 1,), store_dtype="float32")
IMAGES = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
MAPS = ("features", "concept_maps", "cross_attention", "text_attention", "sigmas")


class _Stream:
    def synchronize(self):
        pass


class _Backend:  # diffusers' TorchDeviceBackend for a device with streams
    def __init__(self, _device):
        pass

    def stream(self, _stream):
        return contextlib.nullcontext()

    def current_stream(self):
        return _Stream()


class _OffloadDevice:
    """A group's offload device as diffusers' fallback test (`params[0].device == offload_device`) sees it: the
    weights are there unless the group was onloaded since it was last offloaded."""

    def __init__(self, resident: dict, key: int):
        self.resident, self.key = resident, key

    def __eq__(self, _device):
        return not self.resident.get(self.key, False)

    def __ne__(self, device):
        return not self == device

    __hash__ = object.__hash__


class StreamedOffload:
    """Leaf-level group offload with a stream on `transformer`, and what each transformer call loaded: the groups
    onloaded (prefetched by the chain, or loaded by their own layer) and the synchronous fallbacks among them."""

    def __init__(self, monkeypatch, transformer):
        monkeypatch.setattr(go, "TorchDeviceBackend", _Backend)

        @contextlib.contextmanager
        def unpinned(group):  # a CPU-only torch cannot pin memory
            yield group.cpu_param_dict

        monkeypatch.setattr(go.ModuleGroup, "_pinned_memory_tensors", unpinned)
        self.resident: dict[int, bool] = {}
        self.names: dict[int, str] = {}
        self.calls: list[dict] = []  # per transformer call: loads, fallbacks
        spy, running = self, []

        onload, offload = go.ModuleGroup.onload_, go.ModuleGroup.offload_
        pre_forward = go.GroupOffloadingHook.pre_forward

        def onload_(group):
            spy.resident[id(group)] = True
            if spy.calls and id(group) in spy.names:
                name = spy.names[id(group)]
                spy.calls[-1]["loads"].append(name)
                if running and running[-1] is group and not group.onload_self:  # its own layer, outside the chain
                    spy.calls[-1]["fallbacks"].append(name)
            return onload(group)

        def offload_(group):
            spy.resident[id(group)] = False
            return offload(group)

        def pre(hook, module, *args, **kwargs):
            running.append(hook.group)
            try:
                return pre_forward(hook, module, *args, **kwargs)
            finally:
                running.pop()

        monkeypatch.setattr(go.ModuleGroup, "onload_", onload_)
        monkeypatch.setattr(go.ModuleGroup, "offload_", offload_)
        monkeypatch.setattr(go.GroupOffloadingHook, "pre_forward", pre)  # before the hooks bind it

        config = go.GroupOffloadingConfig(
            onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
            offload_type=go.GroupOffloadingType.LEAF_LEVEL, non_blocking=False, record_stream=False,
            low_cpu_mem_usage=True, stream=_Stream())
        go._apply_group_offloading(transformer, config)
        self.top = None
        for name, m in transformer.named_modules():
            hook = m._diffusers_hook.get_hook("group_offloading") if hasattr(m, "_diffusers_hook") else None
            if hook is not None:
                self.names[id(hook.group)] = name or "<transformer>"
                hook.group.offload_device = _OffloadDevice(self.resident, id(hook.group))
                if m is transformer:
                    self.top = hook
        self.layers = sorted(n for n in self.names.values() if n != "<transformer>")
        # First among the transformer's pre-hooks: capture's own may call layers.
        transformer.register_forward_pre_hook(lambda *_: self.calls.append({"loads": [], "fallbacks": []}),
                                              prepend=True)

    def chain(self) -> list[str]:
        """The layers in the order the prefetch chain loads them, from the transformer's own group."""
        out, hook = [], self.top
        while hook is not None and hook.next_group is not None and len(out) <= len(self.names):
            group = hook.next_group
            out.append(self.names[id(group)])
            hook = group.onload_leader._diffusers_hook.get_hook("group_offloading")
        return out


def _forward_order(bb) -> list[str]:
    """The layers with weights or buffers (SD3's positional table) of a plain forward (no capture) of a resident
    copy, in the order they run."""
    order, handles = [], []
    for name, m in bb.transformer.named_modules():
        if name and (list(m.parameters(recurse=False)) or list(m.buffers(recurse=False))):
            handles.append(m.register_forward_pre_hook(lambda *_, n=name: order.append(n)))
    x0 = bb.encode_images(torch.zeros(1, 3, 64, 64))
    inputs = bb.transformer_inputs(x0, torch.full((1,), 0.5), bb.encode_prompts(PROMPTS[:1], 16), 3.5, 64, 64)
    with torch.no_grad():
        bb.transformer(**inputs)
    for h in handles:
        h.remove()
    return order


@pytest.fixture(scope="module", params=list(FAMILIES))
def reference(request):
    f = FAMILIES[request.param]
    bb = wrap_pipeline(f.build(), name=f.name)
    kw, spec = {**KW, **f.cfg}, _spec(bb)
    return f, kw, generate(bb, PROMPTS, spec, seeds=SEEDS, **kw), extract(bb, IMAGES, spec, captions=PROMPTS), \
        _forward_order(bb)


def _identical(gen, real, ref):
    if gen is not None:
        assert np.array_equal(gen.images, ref[2].images)
        for name in MAPS:
            assert torch.equal(getattr(gen.capture, name), getattr(ref[2].capture, name)), name
    if real is not None:
        for name in MAPS:
            assert torch.equal(getattr(real, name), getattr(ref[3], name)), name


@pytest.mark.parametrize("first", ["generate", "extract"])
def test_every_call_loads_each_layer_once_through_the_prefetch_chain(monkeypatch, reference, first):
    f, kw = reference[:2]
    pipe = f.build()
    spy = StreamedOffload(monkeypatch, pipe.transformer)
    bb = wrap_pipeline(pipe, name=f.name)
    spec = _spec(bb)
    armed = []
    bb.transformer.register_forward_pre_hook(lambda *_: armed.append(bb._capture_hooks.armed))
    gen = real = None
    if first == "extract":  # the order is recorded in an armed call, the concept stream running in it
        real = extract(bb, IMAGES, spec, captions=PROMPTS)
        _identical(None, real, reference)
    gen = generate(bb, PROMPTS, spec, seeds=SEEDS, **kw)  # (first: unarmed; the concept tokens encoded before it)
    _identical(gen, None, reference)
    if first == "generate":
        _identical(generate(bb, PROMPTS, spec, seeds=SEEDS, **kw), extract(bb, IMAGES, spec, captions=PROMPTS),
                   reference)

    # The chain is the transformer's own forward: each layer once, in the order it runs (the concept stream's
    # layers where the block runs them), nothing capture calls outside it.
    assert spy.chain() == reference[4]
    assert sorted(spy.chain()) == spy.layers
    # After the first call: every call, armed or not, loads each layer exactly once, all by the chain.
    assert len(spy.calls) == len(armed) and sum(armed) >= 5 and not all(armed[1:])
    for call, was_armed in list(zip(spy.calls, armed))[1:]:
        assert call["fallbacks"] == [], (was_armed, call["fallbacks"])
        assert sorted(call["loads"]) == sorted(["<transformer>", *spy.layers]), was_armed
    # Nothing stays on the device between calls but the first layer, which the transformer's hook prefetched.
    assert [spy.names[k] for k, on in spy.resident.items() if on] in ([], ["<transformer>"])
