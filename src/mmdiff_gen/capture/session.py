"""`Capture`: the context manager that owns every hook and all per-run storage of one capture."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..backbones.base import Backbone
from ._gate import Gate
from .concepts import ConceptTap
from .features import FeatureTap
from .spec import CaptureSpec
from .text_attention import TextAttentionTap


@dataclass
class CaptureResult:
    """Everything one capture recorded, per sample.

    Attributes:
        features: (B, L, T, N, C) image-token features, layers × sigmas (noisiest first).
        sigmas: (B, T) float32, the sigma each sample's transformer call actually received.
        layers: feature-block indices, in the order of the L axis.
        target_sigmas: the configured sigmas, in the order of the T axis.
        grid: (h, w) image tokens; N = h·w, row-major.
        concepts: concept words, in the order of the K axis.
        concept_maps: (B, T, K, N) float32 softmax-over-concepts maps, mean over concept layers.
        cross_attention: (B, T, N) float32 averaged image→prompt attention, mean over concept layers.
        text_attention: (B, T, L', N, S) float32 image→text attention per text token at the spec's
            text-attention layers (Backbone.attention_blocks indices), mean over heads.
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

    def feature_maps(self) -> torch.Tensor:
        """(B, L, T, C, h, w) view of the features as spatial maps."""
        b, l, t, n, c = self.features.shape
        h, w = self.grid
        return self.features.view(b, l, t, h, w, c).permute(0, 1, 2, 5, 3, 4)

    def mean_concept_maps(self) -> torch.Tensor | None:
        """(B, K, h, w): concept maps averaged over the captured sigmas (MMDiff §3.2)."""
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
        )


class Capture:
    """Hooks a backbone for one run and collects features (and maps) at the spec's sigmas.

    Usage::

        with Capture(backbone, spec, batch_size=B, height=H, width=W) as cap:
            pipe(...)                       # or any transformer forward
        result = cap.result()

    Args:
        backbone: the wrapped pipeline.
        spec: what to capture.
        batch_size: samples per run; each target sigma must be received by exactly that many rows.
        height, width: image size in pixels (gives the token grid).
        text_mask: (B, S) bool prompt-token mask, only used by the cross-attention baseline.
        cfg_in_batch: the pipeline runs CFG as [uncond; cond] rows of one call (Backbone.cfg_in_batch).
    """

    def __init__(
        self,
        backbone: Backbone,
        spec: CaptureSpec,
        *,
        batch_size: int,
        height: int,
        width: int,
        text_mask: torch.Tensor | None = None,
        cfg_in_batch: bool = False,
    ):
        self.backbone = backbone
        self.spec = spec
        self.grid = backbone.token_grid(height, width)
        self.layers = spec.layers if spec.layers is not None else backbone.default_layers()
        self.concept_layers = spec.concept_layers if spec.concept_layers is not None else backbone.default_concept_layers()
        self.gate = Gate(sigmas=spec.sigmas, batch_size=batch_size, cfg_in_batch=cfg_in_batch)
        self.features = FeatureTap(
            backbone.feature_blocks,
            self.layers,
            len(spec.sigmas),
            backbone.image_tokens,
            spec.torch_store_dtype,
            spec.store_device,
        )
        self.concepts: ConceptTap | None = None
        if spec.concepts or spec.cross_attention:
            init = backbone.encode_concepts(spec.concepts) if spec.concepts else None
            self.concepts = ConceptTap(
                backbone.joint_blocks,
                self.concept_layers,
                init,
                backbone.concept_temb,
                spec.cross_attention,
                text_mask,
            )
        self.text: TextAttentionTap | None = None
        if spec.text_attention_layers:
            self.text = TextAttentionTap(backbone.attention_blocks, spec.text_attention_layers, spec.store_device)
        self._handles: list[Any] = []

    # --- context manager --------------------------------------------------------------------
    def __enter__(self) -> "Capture":
        # Only the transformer is hooked for the whole run; block hooks are attached for the calls
        # that reach a target sigma and removed after, so the other steps run at full speed.
        tr = self.backbone.transformer
        self._handles = [
            tr.register_forward_pre_hook(self._on_call_start, with_kwargs=True),
            tr.register_forward_hook(self._on_call_end),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._detach_taps()

    def _detach_taps(self) -> None:
        self.features.detach()
        for tap in (self.concepts, self.text):
            if tap is not None:
                tap.detach()

    def _on_call_start(self, _module, _args, kwargs):
        timestep = kwargs["timestep"]
        self.gate.begin_call(self.backbone.sigma_of(timestep), kwargs)
        if not self.gate.active:
            return
        self.features.active = self.gate.active
        self.features.attach()
        if self.concepts is not None:
            self.concepts.attach()
            with torch.no_grad():
                self.concepts.begin_call(self.gate.active, timestep, kwargs.get("guidance"))
        if self.text is not None:
            self.text.attach()
            self.text.begin_call(self.gate.active)

    def _on_call_end(self, _module, _args, _output):
        if self.gate.active:
            self.features.active = []
            self._detach_taps()
            if self.concepts is not None:
                self.concepts.end_call()
            if self.text is not None:
                self.text.end_call()
        self.gate.end_call()

    # --- extra forward for sigmas below the schedule -----------------------------------------
    @torch.no_grad()
    def forward_at(self, latents: torch.Tensor, sigma: float) -> None:
        """Run the transformer once on `latents` at `sigma`, with the last conditional call's inputs.

        Used by the timestep contract for targets below the sampler's last step.
        """
        kwargs = self.gate.cond_kwargs
        if kwargs is None:
            raise RuntimeError("forward_at needs a prior transformer call to take its conditioning from")
        kwargs = dict(kwargs)
        ts = kwargs["timestep"]
        kwargs["timestep"] = torch.full_like(ts, self.backbone.timestep_for(sigma))
        kwargs["hidden_states"] = latents.to(kwargs["hidden_states"].dtype)
        self.backbone.transformer(**kwargs)

    # --- result -----------------------------------------------------------------------------
    def result(self) -> CaptureResult:
        missing = self.gate.missing
        if missing:
            raise RuntimeError(f"the transformer was never evaluated at sigma {missing}: the schedule misses them")
        sig = torch.stack([self.gate.received[j] for j in range(len(self.spec.sigmas))], dim=1)  # (B, T)
        dev = self.features.buffer.device
        concept_maps = cross = None
        if self.concepts is not None:
            n_layers = len(self.concept_layers)
            if self.concepts.concept_sum:
                concept_maps = torch.stack(
                    [self.concepts.concept_sum[j] / n_layers for j in range(len(self.spec.sigmas))], dim=1
                ).transpose(2, 3).to(dev)  # (B, T, N, K) → (B, T, K, N)
            if self.concepts.cross_sum:
                cross = torch.stack(
                    [self.concepts.cross_sum[j] / n_layers for j in range(len(self.spec.sigmas))], dim=1
                ).to(dev)  # (B, T, N)
        text = None
        if self.text is not None:
            slots = range(len(self.spec.text_attention_layers))
            text = torch.stack([torch.stack([self.text.store[j][s] for s in slots], dim=1)
                                for j in range(len(self.spec.sigmas))], dim=1).to(dev)  # (B, T, L', N, S)
        return CaptureResult(
            features=self.features.buffer,
            sigmas=sig,
            layers=self.layers,
            target_sigmas=self.spec.sigmas,
            grid=self.grid,
            concepts=self.spec.concepts,
            concept_maps=concept_maps,
            cross_attention=cross,
            text_attention=text,
            text_attention_layers=self.spec.text_attention_layers,
        )
