"""Train one head on a feature cache: AdamW (decoder at half rate), EMA, resumable, multi-GPU via accelerate.

Under torchrun / accelerate launch / srun every process reads only its share of each global batch
(`FeatureCache.batches`), and every process runs the same number of steps, so DDP never waits on a rank
that has no batch left."""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..heads.checkpoint import HeadMeta, save_head
from ..heads.inputs import check_side, reads_concepts, run_head, side_maps
from ..heads.model import HeadConfig, MMDiffHead
from ..io.state import load_state, save_state
from .evaluate import evaluate_head
from .feature_cache import FeatureCache
from .losses import LOSSES


@dataclass(frozen=True)
class TrainConfig:
    """How to train one head.

    Args:
        task: "seg", "saliency" or "depth".
        epochs: passes over the cache (paper: 20 in the controlled comparison).
        batch_size: samples per step and process (W processes step on W × batch_size samples together).
        lr: AdamW base rate for the aggregation modules (paper: 1e-4).
        decoder_lr_scale: decoders train at this fraction of `lr` (paper: 0.5).
        weight_decay: AdamW weight decay.
        ema: EMA decay of the evaluated / saved weights (paper: 0.999), warmed up as (1 + step) / (10 + step).
        timesteps: indices of the cache's sigmas to use (None: all); a single index makes a
            single-timestep head (projection only).
        side: "concepts" (concept maps), "cross" (averaged cross-attention), "both" or "none".
        fusion: "learned" or "mean" (ablation).
        head: HeadConfig overrides (dim, decoder_channels, aspp_rates, …).
        dino: also read the cache's DINOv3 maps (concatenated with the side maps, MMDiff §3.3).
        seed: shuffling and initialisation seed.
    """

    task: str
    epochs: int = 20
    batch_size: int = 16
    lr: float = 1e-4
    decoder_lr_scale: float = 0.5
    weight_decay: float = 0.01
    ema: float = 0.999
    timesteps: tuple[int, ...] | None = None
    side: str = "concepts"
    fusion: str = "learned"
    head: tuple[tuple[str, object], ...] = ()
    dino: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.task not in LOSSES:
            raise KeyError(f"unknown task {self.task!r}; known: {', '.join(LOSSES)}")
        check_side(self.side)


def build_head(cache: FeatureCache, cfg: TrainConfig, num_classes: int) -> MMDiffHead:
    first = next(cache.batches(1))  # one sample: the shapes
    _, l, t, _, c = first["features"].shape
    t_used = t if cfg.timesteps is None else len(cfg.timesteps)
    cm, ca = side_maps(cfg.side, first, "the cache")
    k = (0 if cm is None else cm.shape[2]) + (0 if ca is None else 1)
    extra = _dino(cfg.dino, first)
    e = 0 if extra is None else extra.shape[1]
    h = cache.grid[0]
    rates = tuple(sorted({max(1, round(r * h / 32)) for r in (6, 12, 18)}))  # DeepLabV3's rates at a 32-token grid
    head_cfg = HeadConfig(task=cfg.task, feature_dim=c, num_layers=l, num_timesteps=t_used, num_concepts=k,
                          num_classes=num_classes, fusion=cfg.fusion if t_used > 1 else "mean", aspp_rates=rates,
                          extra_channels=e)
    head_cfg = replace(head_cfg, **dict(cfg.head))
    torch.manual_seed(cfg.seed)
    return MMDiffHead(head_cfg)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema ← decay · ema + (1 − decay) · model for parameters; buffers (norm statistics) are copied."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def _dino(use: bool, batch: dict) -> torch.Tensor | None:
    if use and "dino" not in batch:
        raise ValueError("the cache has no DINOv3 maps: extract it with --dino PATH")
    return batch["dino"] if use else None


def train_head(cache: FeatureCache, cfg: TrainConfig, out: Path, *, classes: list[str], palette: list | None = None,
               eval_cache: FeatureCache | None = None, depth_unit: str = "") -> dict:
    """Train, evaluate the EMA weights on `eval_cache` (if given) and write out (safetensors head file).

    Resumes from the hidden per-epoch state file beside `out` (.NAME.state.safetensors). Returns the metrics
    (on the main process; evaluation runs there only, and the others return {}).
    """
    from accelerate import Accelerator

    acc = Accelerator(cpu=not torch.cuda.is_available())  # without cpu=True, CPU workers would not form a group
    out = Path(out)
    num_classes = len(classes) if cfg.task == "seg" else 1
    model = build_head(cache, cfg, num_classes)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW([
        {"params": model.aggregators.parameters(), "lr": cfg.lr},
        {"params": model.decoder.parameters(), "lr": cfg.lr * cfg.decoder_lr_scale},
    ], weight_decay=cfg.weight_decay)
    model, opt = acc.prepare(model, opt)
    state_path = out.with_name(f".{out.stem}.state.safetensors")  # hidden, git-ignored: resumable per-epoch state
    start = 0
    if state_path.is_file():
        st = load_state(state_path)  # never unpickles: a planted or damaged file is refused with one line
        acc.unwrap_model(model).load_state_dict(st["model"])
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["opt"])
        start = st["epoch"]
    ema.to(acc.device)
    grid, size = cache.grid, cache.image_size
    loss_fn = LOSSES[cfg.task]
    label = {"seg": "seg", "saliency": "saliency", "depth": "depth"}[cfg.task]
    gen = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = cache.num_batches(cfg.batch_size, acc.num_processes)  # the same on every rank
    for epoch in range(start, cfg.epochs):
        gen.manual_seed(cfg.seed + epoch)
        model.train()
        t0, total, n = time.time(), 0.0, 0
        for i, batch in enumerate(cache.batches(cfg.batch_size, shuffle=True, generator=gen, rank=acc.process_index,
                                                world_size=acc.num_processes)):
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            pred = run_head(model, cfg.side, batch, grid, size, timesteps=cfg.timesteps, extra=_dino(cfg.dino, batch),
                            source="the cache")
            loss = loss_fn(pred.float(), batch[label])
            opt.zero_grad(set_to_none=True)
            acc.backward(loss)
            opt.step()
            step = epoch * steps_per_epoch + i
            # EMA warm-up: early weights must not dominate short runs.
            ema_update(ema, acc.unwrap_model(model), min(cfg.ema, (1 + step) / (10 + step)))
            total, n = total + loss.item(), n + 1
        mean = acc.reduce(torch.tensor([total / max(n, 1)], device=acc.device), reduction="mean").item()
        if acc.is_main_process:
            print(f"[{cfg.task}] epoch {epoch + 1}/{cfg.epochs} loss {mean:.4f} "
                  f"({steps_per_epoch} steps, {time.time() - t0:.1f} s)", file=sys.stderr, flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            save_state(state_path, {"model": acc.unwrap_model(model).state_dict(), "ema": ema.state_dict(),
                                    "opt": opt.state_dict(), "epoch": epoch + 1})
        acc.wait_for_everyone()
    metrics = {}
    if eval_cache is not None and acc.is_main_process:  # the others are done: no barrier to time out on
        metrics = evaluate_head(ema, cfg.task, cfg.side, cfg.timesteps, eval_cache, classes)
    if acc.is_main_process:
        spec = cache.spec
        idx = list(range(len(spec.sigmas))) if cfg.timesteps is None else list(cfg.timesteps)
        meta = HeadMeta(
            config=ema.config, backbone=cache.manifest["backbone"], layers=list(cache.layers), blocks=spec.blocks,
            sigmas=[spec.sigmas[i] for i in idx], concepts=list(spec.concepts) if reads_concepts(cfg.side) else [],
            classes=list(classes) if cfg.task == "seg" else [cfg.task], palette=[list(p) for p in (palette or [])],
            metrics={**metrics, "train": {"cache": str(cache.root), "samples": len(cache), "config": asdict(cfg)}},
            depth_unit=depth_unit, side=cfg.side, dino=cache.manifest.get("dino", {}) if cfg.dino else {},
        )
        save_head(out, ema, meta)
    return metrics
