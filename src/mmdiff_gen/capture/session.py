"""`Capture`: the context manager that owns the per-run storage of one capture and switches the hooks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..backbones.base import Backbone
from ..backbones.runtime import block_offloaded, group_offloaded
from ._gate import Gate, rows_of
from ._hooks import Config, prepare
from .spec import CaptureSpec


@dataclass
class CaptureResult:
    """Everything one capture recorded, per sample.

    Attributes:
        features: (B, L, T, N, C) image-token features, layers × sigmas (noisiest first).
        sigmas: (B, T) float32, the sigma each sample's transformer call actually received.
        layers: feature-block indices, in the order of the L axis.
        target_sigmas: the configured sigmas, in the order of the T axis.
        grid: (h, w) image tokens; N = h·w, row-major. A video backbone's: (f, h, w) latent frames × tokens,
            N = f·h·w, frame-major.
        concepts: concept words, in the order of the K axis.
        concept_maps: (B, T, K, N) float32 softmax-over-concepts maps, mean over concept layers.
        cross_attention: (B, T, N) float32 averaged image→prompt attention, mean over concept layers.
        text_attention: (B, T, L', N, S) float32 image→text attention per text token at the spec's
            text-attention layers (Backbone.attention_blocks indices), mean over heads.
        frames: a clip's decoded frames (grid[0] latent frames hold them); None for images.
    """

    features: torch.Tensor
    sigmas: torch.Tensor
    layers: tuple[int, ...]
    target_sigmas: tuple[float, ...]
    grid: tuple[int, int]
    concepts: tuple[str, ...] = ()
    concept_maps: torch.Tensor | None = None
    cross_attention: torch.Tensor | None = None
    text_attention: torch.Tensor | None = None
    text_attention_layers: tuple[int, ...] = ()
    frames: int | None = None

    def mean_concept_maps(self) -> torch.Tensor | None:
        """(B, K, h, w) (video: (B, K, f, h, w)): concept maps averaged over the captured sigmas (MMDiff §3.2)."""
        if self.concept_maps is None:
            return None
        b, t, k, n = self.concept_maps.shape
        return self.concept_maps.mean(1).view(b, k, *self.grid)

    def sample(self, i: int) -> "CaptureResult":
        """The i-th sample as a batch of one."""
        pick = slice(i, i + 1)
        return CaptureResult(
            features=self.features[pick],
            sigmas=self.sigmas[pick],
            layers=self.layers,
            target_sigmas=self.target_sigmas,
            grid=self.grid,
            concepts=self.concepts,
            concept_maps=None if self.concept_maps is None else self.concept_maps[pick],
            cross_attention=None if self.cross_attention is None else self.cross_attention[pick],
            text_attention=None if self.text_attention is None else self.text_attention[pick],
            text_attention_layers=self.text_attention_layers,
            frames=self.frames,
        )


class Capture:
    """Collects features (and maps) at the spec's sigmas from the calls of one run.

    Usage::

        with Capture(backbone, spec, batch_size=B, height=H, width=W) as cap:
            pipe(...)                       # or any transformer forward
        result = cap.result()

    Around an arbitrary call (as above), each transformer call is matched by the sigma it receives,
    read back to the host: eager mode only. `generate` and `extract` instead `arm` each call from the
    planned schedule (`planned=True`), which also works in a compiled transformer and never syncs.

    Args:
        backbone: the wrapped pipeline.
        spec: what to capture.
        batch_size: samples per run; each target sigma must be received by exactly that many rows.
        height, width: image size in pixels (gives the token grid).
        frames: a video backbone's clip length in frames (the grid gains its latent frames); None for images.
        text_mask: (B, S) bool prompt-token mask, only used by the cross-attention baseline.
        cfg_in_batch: the pipeline runs CFG as [uncond; cond] rows of one call (Backbone.cfg_in_batch).
        planned: calls are armed by the caller (`arm`, `collect`) instead of matched by the sigma received.
    """

    def __init__(
        self,
        backbone: Backbone,
        spec: CaptureSpec,
        *,
        batch_size: int,
        height: int,
        width: int,
        frames: int | None = None,
        text_mask: torch.Tensor | None = None,
        cfg_in_batch: bool = False,
        planned: bool = False,
    ):
        backbone.check_capture()
        self.backbone = backbone
        self.spec = spec
        self.grid = backbone.token_grid(height, width, frames)
        self.frames = frames
        self.layers = spec.layers if spec.layers is not None else backbone.default_layers(blocks=spec.blocks)
        self.concept_layers = spec.concept_layers if spec.concept_layers is not None else backbone.default_concept_layers()
        self.planned = planned
        for name, layers, blocks in (("capture", self.layers, backbone.blocks(spec.blocks)),
                                     ("concept", self.concept_layers, backbone.joint_blocks),
                                     ("text-attention", spec.text_attention_layers, backbone.attention_blocks)):
            if layers and max(layers) >= len(blocks):
                raise ValueError(f"{name} layers {tuple(layers)} out of range: the backbone has {len(blocks)} such blocks")
        stream = bool(spec.concepts or spec.cross_attention)
        if (stream or spec.text_attention_layers) and any(
                getattr(backbone.block_attention(b), "fused_projections", False) for b in backbone.attention_blocks):
            raise ValueError("concept and text-attention capture need unfused QKV projections: call "
                             "transformer.unfuse_qkv_projections()")
        if (stream or spec.text_attention_layers) and block_offloaded(backbone.attention_blocks):
            raise ValueError("block-level group offload moves a block's weights off the device as the block returns, "
                             "before the concept stream reuses them: use offload_type='leaf_level' (what --offload "
                             "group applies)")
        self.hooks = prepare(backbone)
        self.config = Config(
            feature_layers=tuple(self.layers),
            feature_blocks=spec.blocks,
            concept_depth=max(self.concept_layers) + 1 if stream else 0,
            concept_layers=tuple(self.concept_layers) if stream else (),
            init=backbone.encode_concepts(spec.concepts) if spec.concepts else None,
            cross=spec.cross_attention,
            text_layers=tuple(spec.text_attention_layers),
            # Once, here: moved inside an armed call, the host would wait on the device at every concept layer.
            text_mask=None if text_mask is None else text_mask.to(backbone.device, torch.float32),
            dtype=backbone.dtype,
            hold=(stream or bool(spec.text_attention_layers)) and group_offloaded(backbone.transformer),
        )
        self.gate = Gate(sigmas=spec.sigmas, batch_size=batch_size, cfg_in_batch=cfg_in_batch)
        t = len(spec.sigmas)
        # Storage, per target sigma (index into spec.sigmas).
        self.features: torch.Tensor | None = None  # (B, L, T, N, C), every slot written before `result`
        self._written: set[tuple[int, int]] = set()
        self._received: dict[int, torch.Tensor] = {}  # target → (B,) sigmas received, on the compute device
        self._concepts: dict[int, torch.Tensor] = {}  # target → (B, N, K) summed over concept layers
        self._cross: dict[int, torch.Tensor] = {}  # target → (B, N)
        self._text: dict[int, dict[int, torch.Tensor]] = {}  # target → slot → (B, N, S)
        self._copied: Any = None  # CUDA event after the last copy into pinned memory
        self._blocks: torch.Tensor | None = None  # (L, T, B, N, C) pinned, when features are staged off a GPU
        self._num_sigmas = t
        self._last_sigma: float | None = None

    # --- context manager --------------------------------------------------------------------
    def __enter__(self) -> "Capture":
        hooks = self.hooks
        if hooks.listener is not None or hooks.armed:
            raise RuntimeError("another capture is running on this backbone")
        hooks.config = self.config
        hooks.kwargs = None
        if not self.planned:
            hooks.listener = self
        return self

    def __exit__(self, *exc) -> None:
        h = self.hooks  # nothing of this run may outlive it on the backbone (a failed call left it all)
        h.listener = None
        h.armed = h.keep_kwargs = False
        h.out, h.kwargs = {}, None
        h._scratch.clear()
        h._stream = h._temb = h._temb_args = None
        h._release()  # layers a failed call left held on the device go back under group offload

    # --- one call ---------------------------------------------------------------------------
    def arm(self, sigmas: Sequence[float], eps: float | None = None) -> bool:
        """Before a transformer call whose rows will receive `sigmas` (planned, host floats): arm the
        hooks if the call reaches a target. Returns whether it does."""
        self.gate.begin_call(sigmas, *(() if eps is None else (eps,)))
        if self.gate.active:
            self.hooks.arm()
        return bool(self.gate.active)

    def collect(self) -> None:
        """After the call: move what the armed call recorded into this capture's storage."""
        if not self.gate.active:
            return
        out = self.hooks.take()
        for a in self.gate.active:
            self._store(a.target, a.rows, out)
        self.gate.end_call()

    def _store(self, target: int, rows: slice, out: dict) -> None:
        self._received[target] = self.backbone.sigma_of(out["timestep"][rows]).detach()
        for slot, layer in enumerate(self.layers):
            part = out.get(("feat", layer))
            if part is not None:
                self._write_features(slot, target, part[rows])
        concept = [out[("concepts", j)][rows].float() for j in self.config.concept_layers if ("concepts", j) in out]
        if concept:
            self._concepts[target] = sum(concept)
        cross = [out[("cross", j)][rows].float() for j in self.config.concept_layers if ("cross", j) in out]
        if cross:
            self._cross[target] = sum(cross)
        store = torch.device(self.spec.store_device) if self.spec.store_device is not None else None
        for slot, a in enumerate(self.config.text_layers):
            if ("text", a) in out:
                # Straight to the store device (after the call: no armed hook waits): held on the GPU until
                # `result`, every block's maps of every sigma would be (57 blocks × 4 sigmas × B × N × S for the
                # layer probe: ≈ 85 GiB at 1024², batch 16).
                part = out[("text", a)][rows]
                self._text.setdefault(target, {})[slot] = part if store is None else part.to(store)

    def _write_features(self, slot: int, target: int, part: torch.Tensor) -> None:
        """(B, N, C) image tokens into their slot; off a GPU by a non-blocking copy into pinned memory."""
        dtype = self.spec.torch_store_dtype
        if self.features is None:
            device = torch.device(self.spec.store_device) if self.spec.store_device is not None else part.device
            b, l, t = part.shape[0], len(self.layers), self._num_sigmas
            if self._staged(device, part.device):
                # Pinned host memory laid out (L, T, B, N, C): each layer × sigma one contiguous block. A strided
                # destination (features[:, slot, target] for B > 1) is copied through a pageable temporary, and
                # a device-to-host copy into pageable memory blocks the host until it is done.
                self._blocks = self.hooks.pool.get((l, t, b, *part.shape[1:]), dtype)
                self.features = self._blocks.permute(2, 0, 1, 3, 4)  # (B, L, T, N, C), a view: no host copy
            else:
                self.features = torch.empty((b, l, t, *part.shape[1:]), dtype=dtype, device=device)
        if self._blocks is not None:
            # A contiguous source too (FLUX's is a slice of [text; image]): made on the GPU, where it is cheap.
            self._blocks[slot, target].copy_(part.to(dtype).contiguous(), non_blocking=True)
            if part.is_cuda:
                self._copied = torch.cuda.Event()  # on the source GPU's stream, where the copy was queued,
                self._copied.record(torch.cuda.current_stream(part.device))  # whichever GPU is current
        else:
            dst = self.features[:, slot, target]
            dst.copy_(part if dst.device == part.device else part.to(dtype))
        self._written.add((slot, target))

    @staticmethod
    def _staged(store: torch.device, compute: torch.device) -> bool:
        """Whether features leave the compute device for pinned host memory as they are produced."""
        return store.type == "cpu" and compute.type == "cuda"

    # --- a capture around an arbitrary call (eager only) -------------------------------------
    def _auto_begin(self, kwargs: dict[str, Any]) -> None:
        timestep = kwargs["timestep"]
        values = self.backbone.sigma_of(timestep).detach().float().flatten().tolist()  # one device sync per call
        if self._last_sigma is None or values[0] != self._last_sigma:  # a new step: keep its conditional call
            self.hooks.kwargs = rows_of(kwargs, self.gate.cond_rows(len(values)), len(values))
        self._last_sigma = values[0]
        self.arm(values, float(torch.finfo(timestep.dtype).eps))

    def _auto_end(self) -> None:
        self.collect()

    # --- extra forward for sigmas below the schedule -----------------------------------------
    @torch.no_grad()
    def forward_at(self, latents: torch.Tensor, sigma: float) -> None:
        """Run the transformer once on `latents` at `sigma`, with the last conditional call's inputs.

        Used by the timestep contract for targets below the sampler's last step.
        """
        kwargs = self.hooks.kwargs
        if kwargs is None:
            raise RuntimeError("forward_at needs a prior transformer call to take its conditioning from")
        n = kwargs["hidden_states"].shape[0]
        kwargs = dict(rows_of(kwargs, self.gate.cond_rows(n), n))  # SD3's CFG call: its conditional half
        ts = kwargs["timestep"]
        kwargs["timestep"] = torch.full_like(ts, self.backbone.timestep_for(sigma))
        kwargs["hidden_states"] = latents.to(kwargs["hidden_states"].dtype)
        if self.planned:
            self.arm([sigma] * latents.shape[0])
        self.backbone.transformer(**kwargs)
        if self.planned:
            self.collect()

    # --- result -----------------------------------------------------------------------------
    def result(self) -> CaptureResult:
        missing = self.gate.missing
        if missing:
            raise RuntimeError(f"the transformer was never evaluated at sigma {missing}: the schedule misses them")
        t = self._num_sigmas
        unwritten = [(self.layers[s], self.spec.sigmas[j]) for s in range(len(self.layers)) for j in range(t)
                     if (s, j) not in self._written]
        if unwritten:  # a block that did not run (a cache skipped it): its slot would hold garbage
            layer, sigma = unwritten[0]
            raise RuntimeError(f"feature block {layer} produced no output at sigma {sigma} (is a cache skipping "
                               "blocks? caches cannot run under capture)")
        if self._copied is not None:
            self._copied.synchronize()  # the one wait for the non-blocking copies
        sig = torch.stack([self._received[j] for j in range(t)], dim=1).float().cpu()  # (B, T)
        targets = torch.tensor(self.spec.sigmas, dtype=torch.float32)
        off = (sig - targets).abs().amax(0)
        tol = torch.finfo(self.backbone.dtype).eps * targets.clamp(min=1e-3) + 1e-6
        if bool((off > tol).any()):
            j = int((off > tol).nonzero()[0])
            raise RuntimeError(f"the transformer received sigma {float(sig[:, j].max()):.6g} where the plan placed "
                               f"{self.spec.sigmas[j]}: the pipeline did not follow the planned schedule")
        dev = self.features.device
        concept_maps = cross = text = None
        n_layers = len(self.concept_layers)
        if self._concepts:
            concept_maps = torch.stack([self._concepts[j] / n_layers for j in range(t)], dim=1
                                       ).transpose(2, 3).to(dev)  # (B, T, N, K) → (B, T, K, N)
        if self._cross:
            cross = torch.stack([self._cross[j] / n_layers for j in range(t)], dim=1).to(dev)  # (B, T, N)
        if self._text:
            slots = range(len(self.config.text_layers))
            first = self._text[0][0]
            text = torch.empty((first.shape[0], t, len(slots), *first.shape[1:]), dtype=first.dtype, device=dev)
            for j in range(t):  # (B, T, L', N, S) filled block by block, each piece released as it lands
                for s in slots:
                    text[:, j, s] = self._text[j].pop(s)
        return CaptureResult(
            features=self.features,
            sigmas=sig,
            layers=self.layers,
            target_sigmas=self.spec.sigmas,
            grid=self.grid,
            concepts=self.spec.concepts,
            concept_maps=concept_maps,
            cross_attention=cross,
            text_attention=text,
            text_attention_layers=self.spec.text_attention_layers,
            frames=self.frames,
        )
