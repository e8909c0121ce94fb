"""The hooks capture runs on: installed once per backbone, before any compilation, switched by plain state.

torch.compile traces the forward hooks a module has when it is compiled (and does not notice hooks added
later), so hooks that come and go per capture never fire in a compiled transformer. Here every hook is
registered once, on every block capture may read (`prepare`), and does nothing unless `armed`: one more
variant of the compiled graph (armed / not armed), not a recompile per step, layer or target.

Which call is captured is decided outside the transformer, by whoever runs it (the planned schedule in
`generate`, the batch layout in `extract`): `arm()` before the call; the transformer's forward hook
disarms at its end, so the unconditional second call of FLUX's true CFG runs unarmed. Nothing in an
armed call reads a value back to the host. Hooks compute on every row of the call; the caller picks
the conditional rows afterwards (`take`). What an armed call records:

    ("feat", i)        (R, N, C) image tokens of feature block i (or joint block i: Config.feature_blocks)
    ("concepts", j)    (R, N, K) concept maps of joint block j (MMDiff eq. 4), j in the concept layers
    ("cross", j)       (R, N) averaged image→prompt attention of joint block j
    ("text", a)        (R, N, S) image→text attention per text token of attention block a
    "timestep"         (R,) the timestep the transformer received (checked against the plan in `result`)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..backbones.base import Backbone
from ..backbones.runtime import Held, check_compilable, describe
from .concepts import concept_block_update, concept_map, concept_query_map, cross_attention_map
from .text_attention import _heads, _norm, image_text_qk, text_attention


@dataclass(eq=False)
class Config:
    """What armed calls record (constant over a capture; compiled graphs guard on these values).

    Args:
        feature_layers: indices (into the `feature_blocks` list) of the blocks whose image tokens are kept.
        feature_blocks: "feature" or "joint": which of the backbone's block lists feature_layers index.
        concept_depth: the concept stream runs through joint blocks 0..concept_depth−1 (0: no stream).
        concept_layers: joint blocks whose concept (and cross-attention) maps are kept.
        init: (K, C) initial concept tokens, or None (cross-attention only).
        cross: keep the averaged cross-attention maps.
        text_layers: attention-block indices whose per-token image→text attention is kept.
        text_mask: (B, S) bool prompt-token mask of the conditional rows (cross-attention).
    """

    feature_layers: tuple[int, ...] = ()
    feature_blocks: str = "feature"
    concept_depth: int = 0
    concept_layers: tuple[int, ...] = ()
    init: torch.Tensor | None = None
    cross: bool = False
    text_layers: tuple[int, ...] = ()
    text_mask: torch.Tensor | None = None
    dtype: torch.dtype = torch.float32  # the transformer's compute dtype (the concept stream's modulation)
    hold: bool = False  # group offload: layers the hooks call again are held on the device (`Held`)


class PinnedPool:
    """Page-locked CPU buffers for features copied off the GPU, reused across batches.

    A buffer is handed out again only once nothing else refers to its memory (the previous batch's
    result, and every view of it, is gone), so a result a caller keeps is never overwritten.
    """

    def __init__(self, keep: int = 2):
        self.keep, self.buffers = keep, []

    def get(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        for buf in self.buffers:
            if buf.shape == shape and buf.dtype == dtype and _only_reference(buf):
                return buf[:]  # a view: while it (or anything made from it) lives, the buffer is taken
        buf = torch.empty(shape, dtype=dtype, pin_memory=True)
        if len(self.buffers) >= self.keep:
            self.buffers.pop(0)
        self.buffers.append(buf)
        return buf[:]


def _only_reference(buf: torch.Tensor) -> bool:
    """Whether no tensor but `buf` uses its memory (torch's storage use count; a private API: if it is gone,
    buffers are simply not reused)."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    return count is not None and count(buf.untyped_storage()._cdata) == 2  # `buf` + the storage object asked


@dataclass(eq=False)
class _Where:
    """A hooked block's indices in the backbone's three block lists (None where it is not one)."""

    feature: int | None = None
    joint: int | None = None
    attention: int | None = None


@dataclass(eq=False)
class CaptureHooks:
    """Every capture hook of one backbone and the state they read. Get it with `prepare(backbone)`."""

    backbone: Backbone
    config: Config = field(default_factory=Config)
    armed: bool = False
    keep_kwargs: bool = False  # the next call's kwargs are kept (the extra forward's conditioning)
    kwargs: dict[str, Any] | None = None
    listener: Any = None  # an eager-only capture that identifies calls by the sigma received (Capture, auto mode)
    out: dict[Any, Any] = field(default_factory=dict)
    pool: PinnedPool = field(default_factory=PinnedPool)
    _scratch: dict[str, Any] = field(default_factory=dict)
    _stream: torch.Tensor | None = None
    _temb: torch.Tensor | None = None
    _temb_args: tuple[torch.Tensor, torch.Tensor | None] | None = None  # (timestep, guidance) of the armed call
    _held: list[Held] = field(default_factory=list)
    handles: list[Any] = field(default_factory=list)
    _hooked: list[tuple[Any, str, nn.Module]] = field(default_factory=list)  # (parent, attribute, the module hooked)

    # --- switching (eager, between transformer calls) -----------------------------------------
    def arm(self) -> None:
        """Record the next transformer call."""
        self.out = {}
        self.armed = True

    def take(self) -> dict[Any, Any]:
        """What the last armed call recorded; raises if its hooks never ran."""
        out, self.out = self.out, {}
        blocks_ran = all(("feat", i) in out for i in self.config.feature_layers)
        if self.armed or not blocks_ran:
            self.armed = False
            raise RuntimeError(
                "capture hooks did not run in the transformer call: it was compiled (and run) before "
                "mmdiff_gen.capture.prepare(backbone) installed them, so the compiled graph has none; call "
                "prepare, or compile_backbone, before compiling")
        return out

    # --- hooks --------------------------------------------------------------------------------
    def _install(self) -> None:
        _eager_when_called_alone(CaptureHooks._on_call_start, CaptureHooks._on_call_end,
                                 self._on_block_start(_Where()), self._on_block_end(_Where()))
        bb = self.backbone
        where: dict[int, tuple[nn.Module, _Where]] = {}
        for kind, blocks in (("feature", bb.feature_blocks), ("joint", bb.joint_blocks),
                             ("attention", bb.attention_blocks)):
            for i, blk in enumerate(blocks):
                entry = where.setdefault(id(blk), (blk, _Where()))[1]
                setattr(entry, kind, i)
        tr = bb.transformer
        self.handles = [tr.register_forward_pre_hook(self._on_call_start, with_kwargs=True),
                        tr.register_forward_hook(self._on_call_end)]
        for blk, w in where.values():
            self.handles.append(blk.register_forward_hook(self._on_block_end(w)))
            if w.joint is None and w.attention is None:
                continue
            attn = bb.block_attention(blk)
            self.handles.append(blk.register_forward_pre_hook(self._on_block_start(w), with_kwargs=True))
            for name in ("to_q", "to_k", "to_v", "add_k_proj"):
                if getattr(attn, name, None) is not None:
                    self.handles.append(getattr(attn, name).register_forward_hook(self._keep(name)))
                    self._hooked.append((attn, name, getattr(attn, name)))
            if getattr(attn, "to_out", None) is not None:
                self.handles.append(attn.to_out[0].register_forward_pre_hook(self._keep_input("image_out")))
                self._hooked.append((attn.to_out, "0", attn.to_out[0]))

    def stale(self) -> bool:
        """Whether a hooked projection was replaced since (a LoRA added by peft wraps `to_q` & co. in a new module,
        leaving these hooks on the bare base layer: they would read projections without the LoRA)."""
        return any((parent[int(name)] if name.isdigit() else getattr(parent, name, None)) is not module
                   for parent, name, module in self._hooked)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles, self._hooked = [], []

    def _on_call_start(self, _module, _args, kwargs):
        if self.listener is not None:
            self.listener._auto_begin(kwargs)  # eager only: reads the sigma back to the host
        if self.keep_kwargs:
            self.kwargs = dict(kwargs)
            self.keep_kwargs = False
        if self.armed:
            cfg = self.config
            if cfg.hold:
                self._release()  # whatever a failed call left held
            timestep = kwargs["timestep"]
            self.out["timestep"] = timestep
            if cfg.init is not None and not self.backbone.CROSS_ATTENTION:  # a concept stream through joint blocks
                rows = timestep.shape[0]
                self._stream = cfg.init.unsqueeze(0).expand(rows, -1, -1)  # (R, K, C)
                # The modulation is computed in the first joint block's hook, from the time embedder the forward
                # has run by then (onloaded under model offload; held on the device under group offload).
                self._temb, self._temb_args = None, (timestep, kwargs.get("guidance"))
                if cfg.hold:
                    for name in self.backbone.CONCEPT_EMBEDDERS:
                        self._hold(getattr(self.backbone.transformer, name, None))

    def _on_call_end(self, _module, _args, _output):
        if self.armed:
            self.armed = False
            self._stream = self._temb = self._temb_args = None
            if self.config.hold:
                self._release()
        if self.listener is not None:
            self.listener._auto_end()

    def _reuses(self, w: _Where) -> bool:
        """Whether the armed hooks call this block's layers after it returned."""
        cfg = self.config
        concepts = cfg.concept_layers if self.backbone.CROSS_ATTENTION else range(cfg.concept_depth)
        return (w.joint is not None and w.joint in concepts) or (
            w.attention is not None and w.attention in cfg.text_layers)

    def _on_block_start(self, w: _Where) -> Callable:
        def hook(block, _args, kwargs):
            if self.armed:
                self._scratch.clear()
                self._scratch["rotary"] = kwargs.get("image_rotary_emb")
                enc = kwargs.get("encoder_hidden_states")
                self._scratch["text_len"] = None if enc is None else enc.shape[1]
                self._scratch["key_mask"] = kwargs.get("encoder_hidden_states_mask")  # Qwen-Image's padding mask
                if self.config.hold and self._reuses(w):
                    self._hold(block)
        return hook

    # Group offload (eager: these move no tensor themselves, but diffusers' hooks and graph breaks would).
    @torch.compiler.disable
    def _hold(self, module: nn.Module | None) -> None:
        if module is not None:
            self._held.append(Held(module, self.backbone.transformer))

    @torch.compiler.disable
    def _reuse(self) -> None:
        for held in self._held:
            held.reuse()

    @torch.compiler.disable
    def _release(self) -> None:
        """Every held layer back under offload (a failed call's too: the next armed call and `Capture` end call it)."""
        for held in self._held:
            held.release()
        self._held.clear()

    def _keep(self, name: str) -> Callable:
        def hook(_module, _inputs, output):
            # The block's own projection runs first; the concept stream calling the same module later
            # in the block must not replace it.
            if self.armed and name not in self._scratch:
                self._scratch[name] = output
        return hook

    def _keep_input(self, name: str) -> Callable:
        def hook(_module, inputs):
            if self.armed and name not in self._scratch:
                self._scratch[name] = inputs[0]
        return hook

    def _on_block_end(self, w: _Where) -> Callable:
        def hook(block, _inputs, output):
            if not self.armed:
                return
            cfg = self.config
            i = w.feature if cfg.feature_blocks == "feature" else w.joint
            if i is not None and i in cfg.feature_layers:
                self.out[("feat", i)] = self.backbone.image_tokens(output)  # (R, N, C)
            reuses = self._reuses(w)
            if reuses and "to_k" not in self._scratch:
                raise RuntimeError(
                    "capture hooks inside the blocks did not run: the transformer was compiled (and run) before "
                    "mmdiff_gen.capture.prepare(backbone) installed them; call prepare, or compile_backbone, "
                    "before compiling")
            if reuses and cfg.hold:
                self._reuse()  # the block's layers (and the time embedder) still on the device: call them again
            if w.joint is not None and w.joint < cfg.concept_depth:
                if self.backbone.CROSS_ATTENTION:
                    self._cross_concepts(self.backbone.block_attention(block), w.joint)
                else:
                    self._concepts(block, w.joint)
            if w.attention is not None and w.attention in cfg.text_layers:
                self.out[("text", w.attention)] = self._text_attention(block)
            if reuses and cfg.hold:
                self._release()
            self._scratch.clear()  # nothing of the block outlives it (in a compiled graph: no extra outputs)
        return hook

    def _concepts(self, block: nn.Module, idx: int) -> None:
        """The concept stream through one joint block, and its maps if the block is a concept layer."""
        cfg, sc, attn = self.config, self._scratch, block.attn
        rotary, rotate = sc["rotary"], self.backbone.rotate
        image_keys = rotate(_norm(attn.norm_k, _heads(attn, sc["to_k"])), rotary, "image")  # (R, N, H, D)
        if cfg.init is not None:
            if self._temb is None:  # the first joint block: the time embedder has run in this forward
                timestep, guidance = self._temb_args
                self._temb = self.backbone.concept_temb(timestep, guidance, cfg.dtype)
            image_values = _heads(attn, sc["to_v"])
            self._stream, concept_out = concept_block_update(block, self._stream, self._temb, image_keys, image_values,
                                                             lambda x: rotate(x, rotary, "concept"))
            if idx in cfg.concept_layers:
                self.out[("concepts", idx)] = concept_map(sc["image_out"], concept_out)  # (R, N, K)
        if cfg.cross and idx in cfg.concept_layers:
            q = rotate(_norm(attn.norm_q, _heads(attn, sc["to_q"])), rotary, "image")
            tk = rotate(_norm(attn.norm_added_k, _heads(attn, sc["add_k_proj"])), rotary, "text")
            self.out[("cross", idx)] = cross_attention_map(q, tk, image_keys, self._text_mask(q.shape[0]),
                                                          sc["key_mask"])  # (R, N)

    def _text_mask(self, rows: int) -> torch.Tensor | None:
        """The prompt-token mask (B, S) for a call of `rows` rows (repeated when the call also carries other rows)."""
        mask = self.config.text_mask
        return mask if mask is None or mask.shape[0] == rows else mask.repeat(rows // mask.shape[0], 1)

    def _cross_concepts(self, attn: nn.Module, idx: int) -> None:
        """Concept and cross-attention maps of one cross-attention block (Wan's `attn2`), where no concept stream can
        run (the text is never updated). Concept map: the block's image queries against the concept words' keys
        alone — each concept token through the block's own `to_k` and `norm_k`, as a prompt token's key —, softmax
        over the concepts, mean over heads; the block's own attention is untouched."""
        cfg = self.config
        if idx not in cfg.concept_layers:
            return
        q, text_keys, _ = image_text_qk(attn, self._scratch, self.backbone.rotate)  # (R, N, H, D), (R, S, H, D)
        if cfg.init is not None:
            concept_keys = _heads(attn, _norm(attn.norm_k, attn.to_k(cfg.init)))  # (K, H, D)
            self.out[("concepts", idx)] = concept_query_map(q, concept_keys)  # (R, N, K)
        if cfg.cross:
            self.out[("cross", idx)] = cross_attention_map(q, text_keys, None, self._text_mask(q.shape[0]))  # (R, N)

    def _text_attention(self, block: nn.Module) -> torch.Tensor:
        """(R, N, S) image→text attention per text token, recomputed from the block's own q and k."""
        attn = self.backbone.block_attention(block)
        return text_attention(*image_text_qk(attn, self._scratch, self.backbone.rotate), self._scratch["key_mask"])


def _eager_when_called_alone(*functions) -> None:
    """Run these hooks eagerly when dynamo meets them as frames of their own, inline them when it traces.

    Compiling the whole transformer inlines every hook into one graph (armed / unarmed: two variants).
    Compiling the repeated blocks (diffusers' `compile_repeated_blocks`) leaves `Module._call_impl` to
    dynamo's skip list, so a block's own hooks become frames of their own: compiled, each block's
    indices would be guarded, one recompile per block past the recompile limit. Skipping those frames
    (and what they call) runs them as plain Python; the projection hooks, called inside a block's
    compiled forward, stay in its graph.
    """
    try:
        from torch._dynamo.eval_frame import FrameAction, FrameExecStrategy, set_code_exec_strategy
    except ImportError:  # a torch without per-code strategies: only regional compilation would recompile more
        return
    for fn in functions:  # skip the frame and everything it calls (the concept stream runs eagerly there)
        set_code_exec_strategy(fn.__code__, FrameExecStrategy(FrameAction.SKIP, FrameAction.SKIP))


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that record and replay CUDA graphs


def compile_backbone(backbone: Backbone, mode: str = "blocks", torch_mode: str | None = None,
                     **compile_kwargs) -> None:
    """torch.compile the transformer with capture's hooks inside the compiled graphs.

    Args:
        mode: "blocks" (diffusers' `compile_repeated_blocks`: each block class compiled once, a fast
            warm-up; refused for a transformer that declares no repeated blocks, as SD3's, whose blocks differ
            from each other: dual attention, the last one's `context_pre_only`) or "transformer" (the whole
            forward as one graph).
        torch_mode: torch.compile's own `mode` ("default", "max-autotune-no-cudagraphs"; None: torch's default).
        compile_kwargs: passed to torch.compile (backend, dynamic, options…). fullgraph defaults to True for a
            resident transformer stored in full precision or torchao int8 (armed calls never break the graph),
            False under model / group offload or layerwise-cast (fp8) storage: their hooks move or cast weights
            in functions marked `torch.compiler.disable`, where dynamo must break the graph.

    Sequential offload is refused: its weights wait on the meta device, which dynamo cannot trace. So are torch's
    CUDA-graph modes ("reduce-overhead", "max-autotune"): a replayed graph writes into the memory of its recorded
    outputs, which capture hands on as the features of the next call, and it cannot hold an armed call's host-side
    state; "max-autotune-no-cudagraphs" keeps the autotuning without graphs.
    """
    if mode not in ("blocks", "transformer"):
        raise ValueError(f"compile mode must be blocks or transformer, got {mode!r}")
    if torch_mode in CUDA_GRAPH_MODES or (compile_kwargs.get("options") or {}).get("triton.cudagraphs"):
        raise ValueError(f"torch.compile {torch_mode or 'with triton.cudagraphs'} replays CUDA graphs over their "
                         "recorded outputs, which capture keeps as features: use torch_mode 'default' or "
                         "'max-autotune-no-cudagraphs'")
    if torch_mode is not None:
        compile_kwargs["mode"] = torch_mode
    tr = backbone.transformer
    if mode == "blocks" and not getattr(tr, "_repeated_blocks", None):
        raise ValueError(f"{type(tr).__name__} declares no repeated blocks to compile one by one: use compile mode "
                         "'transformer'")
    runtime = describe(backbone.pipe)
    check_compilable(runtime["offload"])
    prepare(backbone)
    compile_kwargs.setdefault("fullgraph", runtime["offload"] == "none" and runtime["storage"] in ("full", "int8"))
    if mode == "blocks":
        tr.compile_repeated_blocks(**compile_kwargs)
    else:
        tr.compile(**compile_kwargs)


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process (compiles and recompiles), for reports."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def prepare(backbone: Backbone) -> CaptureHooks:
    """Install capture's hooks on `backbone` (once; later calls return the same hooks).

    Call it before compiling the transformer yourself (`generate --compile` does it for you): a compiled
    graph only contains the hooks that existed when it was traced. Hooks whose projections were replaced since
    (a LoRA adapter added to the transformer) are reinstalled on the new modules.
    """
    hooks = getattr(backbone, "_capture_hooks", None)
    if hooks is not None and hooks.stale():
        hooks.remove()
        hooks = None
    if hooks is None:
        hooks = CaptureHooks(backbone)
        hooks._install()
        backbone._capture_hooks = hooks
    return hooks
