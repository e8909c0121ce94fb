"""The MMDiff head: per-layer token aggregation, then one DeepLabV3+ or DPT decoder per task.

A head serves one task (the paper's main setting) or several from one aggregation (the unified multi-task
decoder of MMDiff App. C): the aggregation, by far the heavier part, runs once for all of them."""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .. import tasks as registry
from .aggregation import TokenAggregation
from .deeplab import DeepLabV3PlusDecoder
from .dpt import DPTDecoder

FUSIONS = ("learned", "mean")


@dataclass(frozen=True)
class HeadConfig:
    """Constructor arguments of an MMDiffHead; saved in every checkpoint.

    Args:
        tasks: the registered trained tasks it predicts (one, or several sharing the aggregation).
        feature_dim: C, the backbone feature width.
        num_layers: L captured layers.
        num_timesteps: T captured sigmas (noisiest first).
        num_concepts: K concept maps concatenated to the decoder inputs (0: none).
        num_classes: classes of its "classes" task (1 when it has none).
        extra_channels: channels of optional extra maps (e.g. DINOv3 features), 0 = none.
        dim: projected width D; default C / 4 (3072 → 768, the paper's).
        decoder_channels: decoder width (256 as DeepLabV3+ and DPT).
        aspp_rates: DeepLabV3+ dilation rates at the token grid.
        fusion: "learned" (the paper's aggregation) or "mean" (a plain mean over T, an ablation).
            A single-timestep head is num_timesteps = 1 with fusion "mean".
        shared_aggregation: one aggregation module for all layers instead of one per layer. At
            FLUX.1-dev widths one module is ~30 M parameters, so only the shared variant matches
            the paper's "~36 M in total"; per layer (the default) is ~4× that.
        agg_depth, agg_heads, dropout, layer_scale, skip_init: the aggregation module's settings.
        frame_mixing: for clips, the kernel (in latent frames, odd) of a depthwise convolution over time on each
            layer's aggregated map before the decoders, a residual branch that starts at zero (so the head starts as
            the per-frame one); 0: every latent frame is read alone.
    """

    tasks: tuple[str, ...]
    feature_dim: int
    num_layers: int
    num_timesteps: int
    num_concepts: int = 0
    num_classes: int = 1
    extra_channels: int = 0
    dim: int | None = None
    decoder_channels: int = 256
    aspp_rates: tuple[int, ...] = (6, 12, 18)
    fusion: str = "learned"
    shared_aggregation: bool = False
    agg_depth: int = 3
    agg_heads: int = 8
    dropout: float = 0.1
    layer_scale: float = 1e-4  # MMDiff §3.1 (App. F gives 1e-6)
    skip_init: float = 0.1  # MMDiff App. F
    frame_mixing: int = 0

    def __post_init__(self):
        object.__setattr__(self, "tasks", (self.tasks,) if isinstance(self.tasks, str) else tuple(self.tasks))
        untrained = [t for t in self.tasks if not registry.get(t).trained]
        if not self.tasks or untrained or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"a head predicts distinct trained tasks ({', '.join(registry.trained())}), got "
                             f"{', '.join(self.tasks) or 'none'}")
        if sum(registry.get(t).kind == "classes" for t in self.tasks) > 1:
            raise ValueError("one head predicts at most one classes task (num_classes is shared)")
        if self.fusion not in FUSIONS:
            raise KeyError(f"unknown fusion {self.fusion!r}; known: {', '.join(FUSIONS)}")
        if self.fusion == "learned" and self.num_timesteps < 2:
            raise ValueError("one timestep has nothing to fuse: use fusion='mean' (projection only)")
        if self.classes_task is None and self.num_classes != 1:
            raise ValueError(f"{', '.join(self.tasks)} has one output channel")
        object.__setattr__(self, "aspp_rates", tuple(self.aspp_rates))
        if self.frame_mixing < 0 or (self.frame_mixing and self.frame_mixing % 2 == 0):
            raise ValueError(f"frame_mixing is an odd kernel size in latent frames or 0, got {self.frame_mixing}")

    @property
    def name(self) -> str:
        """"seg", or "seg+saliency+depth" for a multi-task head."""
        return "+".join(self.tasks)

    @property
    def classes_task(self) -> str | None:
        return registry.class_task(self.tasks)

    @property
    def width(self) -> int:
        return self.dim or max(8, self.feature_dim // 4)

    def to_dict(self) -> dict:
        return asdict(self)


class _MeanFusion(nn.Module):
    """Ablation: per-timestep LayerNorm + projection, then a plain mean over timesteps."""

    def __init__(self, in_dim: int, dim: int, num_timesteps: int):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(in_dim) for _ in range(num_timesteps))
        self.projs = nn.ModuleList(nn.Linear(in_dim, dim) for _ in range(num_timesteps))

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, t, n, _ = features.shape
        proj = torch.stack([self.projs[i](self.norms[i](features[:, i].float())) for i in range(t)], 1).mean(1)
        return proj.reshape(b, *grid, -1).permute(0, 3, 1, 2)


class FrameMixing(nn.Module):
    """x + proj(depthwise conv over latent frames of x) on one layer's aggregated maps of a clip, proj zero-initialised
    (the identity at first): (B, D, f, h, w) → same."""

    def __init__(self, dim: int, kernel: int):
        super().__init__()
        self.conv = nn.Conv3d(dim, dim, (kernel, 1, 1), padding=(kernel // 2, 0, 0), groups=dim)
        self.proj = nn.Conv3d(dim, dim, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(torch.nn.functional.gelu(self.conv(x)))


class MMDiffHead(nn.Module):
    """Dense prediction of its tasks from captured DiT features.

    forward(features (B, L, T, N, C), grid (h, w), size (H, W), concepts (B, K, h, w) | None,
    extra (B, E, h, w) | None) → {task: (B, num_classes, H, W)}: class logits, a probability logit or a
    positive value (depth, ≥ 0), as the task's kind says.

    Clips (a video backbone's grid (f, h, w), N = f·h·w frame-major, concepts (B, K, f, h, w)): each latent frame
    is aggregated and decoded as an image, after the optional `FrameMixing` over frames → {task: (B, f, classes,
    H, W)}, one prediction per latent frame (`heads.frames.to_frames` spreads them over the decoded frames).
    """

    def __init__(self, config: HeadConfig):
        super().__init__()
        self.config = config
        c = config
        def make() -> nn.Module:
            if c.fusion == "mean":
                return _MeanFusion(c.feature_dim, c.width, c.num_timesteps)
            return TokenAggregation(c.feature_dim, c.width, c.num_timesteps, depth=c.agg_depth, heads=c.agg_heads,
                                    dropout=c.dropout, layer_scale=c.layer_scale, skip_init=c.skip_init)

        self.aggregators = nn.ModuleList(make() for _ in range(1 if c.shared_aggregation else c.num_layers))
        side = c.num_concepts + c.extra_channels
        widths = [c.width] * c.num_layers
        def decoder(task: registry.Task) -> nn.Module:
            if task.decoder == "deeplab":
                return DeepLabV3PlusDecoder(widths, side, c.num_classes, channels=c.decoder_channels,
                                            aspp_rates=c.aspp_rates)
            return DPTDecoder(widths, side, task.kind, channels=c.decoder_channels)

        self.decoders = nn.ModuleDict({t: decoder(registry.get(t)) for t in c.tasks})
        if c.frame_mixing:
            self.mixing = nn.ModuleList(FrameMixing(c.width, c.frame_mixing) for _ in range(c.num_layers))

    def forward(self, features: torch.Tensor, grid: tuple[int, int], size: tuple[int, int],
                concepts: torch.Tensor | None = None, extra: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        c = self.config
        if features.shape[1] != c.num_layers or features.shape[2] != c.num_timesteps:
            raise ValueError(f"expected (B, {c.num_layers}, {c.num_timesteps}, N, C) features, got {tuple(features.shape)}")
        if (concepts is None) != (c.num_concepts == 0) or (extra is None) != (c.extra_channels == 0):
            raise ValueError("concept maps / extra maps must be given exactly when the head was built for them")
        clip = len(grid) == 3
        if clip:  # latent frames into the batch: (B, L, T, f·h·w, C) → (B·f, L, T, h·w, C)
            b, f = features.shape[0], grid[0]
            features = features.unflatten(3, (f, -1)).movedim(3, 1).flatten(0, 1)
            concepts, extra = (None if x is None else x.movedim(2, 1).flatten(0, 1) for x in (concepts, extra))
            grid = tuple(grid[1:])
        elif c.frame_mixing:
            raise ValueError("a head with frame mixing reads clips: its grid is (frames, h, w)")
        maps = [self.aggregators[0 if c.shared_aggregation else i](features[:, i], grid) for i in range(c.num_layers)]
        if clip and c.frame_mixing:  # (B·f, D, h, w) per layer, mixed along f
            maps = [m(x.unflatten(0, (b, f)).movedim(1, 2)).movedim(2, 1).flatten(0, 1) for m, x in zip(self.mixing, maps)]
        sides = [x.float() for x in (concepts, extra) if x is not None]
        side = torch.cat(sides, 1) if sides else None
        out = {t: d(maps, side, size) for t, d in self.decoders.items()}
        return {t: x.unflatten(0, (b, f)) for t, x in out.items()} if clip else out


PRECISIONS = ("auto", "bf16", "fp32")


def head_flops(config: HeadConfig, grid: tuple[int, int], size: tuple[int, int]) -> int:
    """FLOPs of one forward of a head built from `config` on one image's (or clip's: grid (f, h, w)) features
    (L, T, N, C) and side maps on a `grid` of tokens, outputs at `size`: counted on the meta device (no weights, no
    memory, any backbone's width)."""
    from ..backbones.flops import count_flops

    with torch.device("meta"):
        head = MMDiffHead(config)
        feats = torch.empty(1, config.num_layers, config.num_timesteps, math.prod(grid), config.feature_dim)
        side = torch.empty(1, config.num_concepts, *grid) if config.num_concepts else None
        extra = torch.empty(1, config.extra_channels, *grid) if config.extra_channels else None
    with torch.no_grad():
        return count_flops(lambda: head(feats, grid, size, concepts=side, extra=extra))


def head_precision(device: str | torch.device, precision: str = "auto"):
    """The context heads run in: bfloat16 autocast or plain float32.

    "auto" is bf16 autocast on CUDA (tensor cores; on the toy world's 500 held-out renders the shipped
    heads' metrics moved by Δ mIoU +0.0005, Δ max F 0.0000, Δ AbsRel 0.0000, BENCHMARKS.md) and float32
    elsewhere (a CPU gains nothing).
    """
    if bf16_heads(device, precision):
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def bf16_heads(device: str | torch.device, precision: str = "auto") -> bool:
    """Whether `head_precision` autocasts to bfloat16 on `device`."""
    if precision not in PRECISIONS:
        raise ValueError(f"heads precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision == "bf16" or (precision == "auto" and torch.device(device).type == "cuda")


def predictions(task: str, out: torch.Tensor) -> torch.Tensor:
    """A task's head output → its label maps (B, H, W): class ids uint8, probabilities uint8 0–255, or positive
    values float (depth: metres), by the task's kind."""
    kind = registry.get(task).kind
    if kind == "classes":
        return out.float().argmax(1).to(torch.uint8)
    if kind == "probability":
        return (out[:, 0].float().sigmoid() * 255).round().to(torch.uint8)
    return out[:, 0].float()
