"""How a pipeline holds and moves its weights (offload, fp8 / int8 storage), applied through diffusers' own APIs."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

#: --offload: where the weights live between calls. "group" is diffusers' leaf-level group offload (block-level
#: puts a block's weights back on the CPU as the block returns, before capture's concept stream reuses them).
OFFLOAD_MODES = ("none", "model", "sequential", "group")
#: --storage: how the transformer's weights are stored; it always computes in the load dtype.
STORAGE_MODES = ("full", "fp8", "int8")


def check_runtime(offload: str, storage: str, *, device: str | torch.device) -> None:
    """Refuse an unknown mode, offload without an accelerator, or int8 without torchao: before anything loads."""
    if offload not in OFFLOAD_MODES:
        raise ValueError(f"unknown offload {offload!r}; choose from {', '.join(OFFLOAD_MODES)}")
    if storage not in STORAGE_MODES:
        raise ValueError(f"unknown storage {storage!r}; choose from {', '.join(STORAGE_MODES)}")
    if offload != "none" and torch.device(device).type == "cpu":
        raise ValueError(f"--offload {offload} needs a GPU: on the CPU the weights already sit in main memory "
                         "(use --offload none)")
    if storage == "int8":
        _torchao()


#: dtype names accepted by `torch_dtype` (the CLI's --dtype), aliases included.
DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
          "float32": "float32", "fp32": "float32"}


def resolve_device(name: str) -> str:
    """"auto" → cuda when a GPU is visible, else cpu; a device this machine lacks is a ValueError."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name}: not a torch device (auto, cpu, cuda, cuda:1, mps…)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device auto or cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available on this machine (use --device auto or cpu)")
    return name


def torch_dtype(name: str, device: str | torch.device = "cpu") -> torch.dtype:
    """A dtype name; "auto" is bfloat16 on accelerators (FLUX's native dtype) and float32 on the CPU."""
    if name == "auto":
        return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from auto, {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[name])


def check_compilable(offload: str) -> None:
    """Refuse torch.compile under sequential offload (the CLI's --compile before loading, compile_backbone after)."""
    if offload == "sequential":
        raise ValueError("torch.compile cannot run a transformer under sequential offload (its weights wait on the "
                         "meta device): use --offload group or model")


def _torchao():
    try:
        import torchao.quantization as tq
    except ImportError:
        raise ImportError("--storage int8 needs torchao: pip install torchao (or mmdiff-gen[quant])") from None
    return tq


def int8_config() -> Any:
    """torchao's int8 weight-only config (per-row scales; activations stay in the compute dtype)."""
    return _torchao().Int8WeightOnlyConfig()


def apply_runtime(pipe: Any, *, offload: str, storage: str, dtype: torch.dtype, device: str | torch.device) -> None:
    """Store the transformer as asked and place the pipeline, with diffusers' own APIs.

    Refuses nothing: `check_runtime` is the policy (the tests run the offload modes on the CPU, which diffusers
    allows when given the device). int8 weights a loader already quantized (`TorchAoConfig`) are left as they are.
    """
    tr = pipe.transformer
    if storage == "fp8":  # weights kept in fp8, each layer upcast to `dtype` for its forward
        tr.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)
    elif storage == "int8" and describe(pipe)["storage"] != "int8":
        _torchao().quantize_(tr, int8_config())
    dev = torch.device(device)
    if offload == "none":
        pipe.to(dev)
    elif offload == "model":  # each component moves to the device for its own forward (accelerate hooks)
        pipe.enable_model_cpu_offload(device=dev)
    elif offload == "sequential":  # every leaf streamed in for its call; weights on "meta" between calls
        pipe.enable_sequential_cpu_offload(device=dev)
    elif offload == "group":  # each layer its own group, the next one prefetched on a CUDA stream
        cuda = dev.type == "cuda"
        # The VAE stays on the device (≈ 0.2 GB for FLUX's): pipelines call its decode / encode, never its forward,
        # so the stream's order-recording hook never completes there (no prefetch chain: every layer loaded
        # synchronously) and its record grows by every layer at every decode, without bound over a long job.
        pipe.enable_group_offload(onload_device=dev, offload_device=torch.device("cpu"), offload_type="leaf_level",
                                  use_stream=cuda, record_stream=cuda, exclude_modules=["vae"])
    else:
        raise ValueError(f"unknown offload {offload!r}; choose from {', '.join(OFFLOAD_MODES)}")


def describe(pipe: Any) -> dict[str, str]:
    """{"offload", "storage"} as the pipeline holds its transformer now, read from diffusers' and accelerate's
    hooks and the transformer's quantization config: what dataset.json records."""
    tr = pipe.transformer
    offload, storage = "none", "full"
    for m in tr.modules():
        hook = getattr(m, "_hf_hook", None)
        if hook is not None:
            if type(hook).__name__ == "CpuOffload":
                offload = "model"
            elif getattr(hook, "offload", False) or any(getattr(h, "offload", False)
                                                        for h in getattr(hook, "hooks", ())):
                offload = "sequential"
        registry = getattr(m, "_diffusers_hook", None)
        if registry is not None:
            if registry.get_hook("group_offloading") is not None:
                offload = "group"
            cast = registry.get_hook("layerwise_casting")
            if cast is not None:
                fp8 = cast.storage_dtype == torch.float8_e4m3fn
                storage = "fp8" if fp8 else str(cast.storage_dtype).removeprefix("torch.")
    quant = tr.config.get("quantization_config") if hasattr(tr.config, "get") else None
    if quant is not None:
        storage = _quant_name(quant)
    elif storage == "full":
        kind = next((type(p).__name__ for p in tr.parameters() if type(p).__module__.startswith("torchao")), None)
        if kind is not None:
            storage = "int8" if kind == "Int8Tensor" else f"torchao-{kind}"
    return {"offload": offload, "storage": storage}


def _quant_name(quant: Any) -> str:
    """A quantization config → a short name: int8 (torchao int8 weight-only), bitsandbytes-nf4, gguf,
    quanto-int8…"""
    get = quant.get if isinstance(quant, dict) else lambda k, d=None: getattr(quant, k, d)
    method = get("quant_method", "quantized")
    method = str(getattr(method, "value", method))  # diffusers' QuantizationMethod enum
    if method == "torchao":
        qt = get("quant_type")
        name = type(qt).__name__ if not isinstance(qt, dict) else str(qt.get("default", qt).get("_type", ""))
        return "int8" if name == "Int8WeightOnlyConfig" else f"torchao-{name or 'custom'}"
    if method == "bitsandbytes":
        if get("load_in_4bit"):
            return f"bitsandbytes-{get('bnb_4bit_quant_type', '4bit')}"
        return "bitsandbytes-int8"
    if method == "quanto":
        return f"quanto-{get('weights_dtype', '')}".rstrip("-")
    return method


def onload(module: nn.Module) -> None:
    """Before calling a submodule of `module` outside `module`'s own forward: under accelerate's model offload the
    whole component moves to the device only in its forward hook, so run that hook's pre_forward first, as
    diffusers' `apply_forward_hook` does for `vae.encode`. Sequential and leaf-level group offload hook every leaf,
    and nothing else moves weights: a no-op there."""
    hook = getattr(module, "_hf_hook", None)
    if hook is not None and hasattr(hook, "pre_forward"):
        hook.pre_forward(module)


@contextmanager
def onloaded(module: nn.Module) -> Iterator[None]:
    """`onload` for a call outside any pipeline call, then, under model offload, the module back on the CPU: the
    pipeline's own components onload in their order and free only their predecessor, so a transformer left on the
    device here would share it with T5 through the next prompt encoding (≈ 24 + 9.5 GB for FLUX.1-dev). Under
    group offload with streams the call is kept out of the prefetch order (`outside_order`)."""
    onload(module)
    try:
        with outside_order(module):
            yield
    finally:
        hook = getattr(module, "_hf_hook", None)
        if type(hook).__name__ == "CpuOffload":
            hook.init_hook(module)  # what accelerate's offload() does: module.to("cpu")


# diffusers 0.42 hooks/group_offloading.py: the hook on every offloaded layer (leaf level: each layer its own group,
# and each module holding bare parameters, e.g. an RMSNorm), and, with streams, the hook on the model that records
# the order its layers run in during its first forward, then links each group to the next one (`next_group`): a
# layer's hook prefetches its successor on the side stream, and a layer nobody prefetched loads synchronously.
_GROUP_HOOK, _ORDER_HOOK = "group_offloading", "lazy_prefetch_group_offloading"


def _group_hook(module: nn.Module) -> Any:
    registry = getattr(module, "_diffusers_hook", None)
    return registry.get_hook(_GROUP_HOOK) if registry is not None else None


def _recorder(model: nn.Module) -> Any:
    """The model's order-recording hook while its first forward under streams has not finished, else None."""
    registry = getattr(model, "_diffusers_hook", None)
    return registry.get_hook(_ORDER_HOOK) if registry is not None else None


@contextmanager
def outside_order(model: nn.Module) -> Iterator[None]:
    """Calls of `model`'s layers inside this block are not part of its forward: keep them out of the order
    diffusers' leaf-level group offload records for its prefetch chain (streams: the model's first forward).

    diffusers links each layer to whichever layer ran after it, the last time, while recording: the concept tokens
    (context embedder) encoded before the first forward, or a concept stream in an armed first forward (`extract`),
    would rewire the chain and leave layers of every later call (armed or not) to load synchronously. A no-op once
    the order is recorded, and without streams."""
    recorder = _recorder(model)
    n = len(recorder.execution_order) if recorder is not None else 0
    try:
        yield
    finally:
        if recorder is not None:
            del recorder.execution_order[n:]


_KEPT = object()  # stands in for a group's leader while it is held: its hooks neither onload nor offload it


class Held:
    """The leaf-level group-offloaded layers of `module`, kept on the device from their next forward until
    `release`: capture calls a block's layers again after the block returned (the concept stream, the attention
    taps), when diffusers would have put them back on the CPU and, outside its prefetch chain, loaded them
    again synchronously. Held, they run again from the copy the chain brought in: one load per layer per call.

    A layer's hook offloads its group as the layer returns only if the layer is the group's offload leader, and
    onloads it (or prefetches the next group) only if it is the onload leader: holding swaps in a marker.
    Nothing is held without group offload (no groups)."""

    def __init__(self, module: nn.Module, model: nn.Module):
        self.model = model
        self.groups = []  # (group, its layer)
        self._recorder, self._recorded = None, 0
        for m in module.modules():
            hook = _group_hook(m)
            if hook is not None and hook.group.onload_leader is m and hook.group.offload_leader is m:
                hook.group.offload_leader = _KEPT  # stays on the device after the block's own call
                self.groups.append((hook.group, m))

    def reuse(self) -> None:
        """From here to `release`, calls of the held layers load nothing, prefetch nothing and are not recorded
        in the prefetch order (`outside_order`)."""
        for group, _ in self.groups:
            if _on_device(group):  # else (a layer its block did not run) diffusers loads it, as it would have
                group.onload_leader = _KEPT
        self._recorder = _recorder(self.model)
        self._recorded = len(self._recorder.execution_order) if self._recorder is not None else 0

    def release(self) -> None:
        """Back under offload: each group off the device, as its layer's hook would have put it."""
        if self._recorder is not None:
            del self._recorder.execution_order[self._recorded:]
            self._recorder = None
        for group, layer in self.groups:
            group.onload_leader = group.offload_leader = layer
            group.offload_()
        self.groups = []


def _on_device(group: Any) -> bool:
    """Whether a group's weights are off the offload device (diffusers' own test before its synchronous fallback)."""
    params = [p for m in group.modules for p in m.parameters()] + list(group.parameters)
    return not params or params[0].device != group.offload_device


def group_offloaded(model: nn.Module) -> bool:
    """Whether any layer of `model` is under diffusers' group offload."""
    return any(_group_hook(m) is not None for m in model.modules())


def block_offloaded(blocks: list[nn.Module]) -> bool:
    """Whether any of these blocks is a group of diffusers' block-level group offload (its weights leave the
    device when the block returns). Leaf-level offload hooks a block itself only for parameters it holds directly
    (Wan's `scale_shift_table`): a group of no modules."""
    for b in blocks:
        registry = getattr(b, "_diffusers_hook", None)
        hook = None if registry is None else registry.get_hook("group_offloading")
        if hook is not None and hook.group.modules:
            return True
    return False
