"""Train one head on a feature cache: AdamW (decoder at half rate), EMA, resumable, multi-GPU via accelerate.

A head may predict several tasks from one aggregation (MMDiff App. C's unified decoder). Their losses are
summed with per-task weights set from the relative loss magnitudes early in training: over the first
`calibration_steps` steps each task's weight is the mean of the tasks' running mean losses divided by its
own, so every task starts contributing alike whatever its loss's scale (cross-entropy over K classes, BCE + soft
IoU, the scale-invariant log loss × 10); then the weights are frozen and recorded in the head file.

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

from ..heads.checkpoint import HeadMeta, save_head, upgrade_keys
from ..heads.inputs import check_side, reads_concepts, run_head, side_maps
from ..heads.model import HeadConfig, MMDiffHead
from ..io.state import load_state, save_state
from ..tasks import canonical, class_task
from ..tasks import get as get_task
from .evaluate import evaluate_head
from .feature_cache import FeatureSource
from .losses import LOSSES


@dataclass(frozen=True)
class TrainConfig:
    """How to train one head.

    Args:
        tasks: the trained tasks the head predicts ("seg"; or several, e.g. ("seg", "saliency", "depth"),
            for one multi-task head); a string is one task.
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
        loss_weights: fixed (task, weight) pairs of a multi-task head; empty: calibrated (module docstring).
        calibration_steps: steps over which the weights are calibrated.
    """

    tasks: tuple[str, ...]
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
    loss_weights: tuple[tuple[str, float], ...] = ()
    calibration_steps: int = 50

    def __post_init__(self):
        tasks = canonical((self.tasks,) if isinstance(self.tasks, str) else self.tasks)
        untrained = [t for t in tasks if not get_task(t).trained]
        if untrained or not tasks:
            raise ValueError(f"no head is trained for {', '.join(untrained) or 'no task'}")
        object.__setattr__(self, "tasks", tasks)
        if self.loss_weights and {t for t, _ in self.loss_weights} != set(tasks):
            raise ValueError(f"loss weights must name exactly the tasks {', '.join(tasks)}")
        check_side(self.side)


def build_head(cache: FeatureSource, cfg: TrainConfig, num_classes: int) -> MMDiffHead:
    first = next(cache.batches(1))  # one sample: the shapes
    _, l, t, _, c = first["features"].shape
    cm, ca = side_maps(cfg.side, first, "the cache")
    k = (0 if cm is None else cm.shape[2]) + (0 if ca is None else 1)
    extra = _dino(cfg.dino, first)
    head_cfg = head_config(cfg, feature_dim=c, num_layers=l, num_timesteps=t, num_side=k, num_classes=num_classes,
                           grid=cache.grid, extra_channels=0 if extra is None else extra.shape[1])
    torch.manual_seed(cfg.seed)
    return MMDiffHead(head_cfg)


def head_config(cfg: TrainConfig, *, feature_dim: int, num_layers: int, num_timesteps: int, num_side: int,
                num_classes: int, grid: tuple[int, int], extra_channels: int = 0) -> HeadConfig:
    """The head `train_head` builds for features (L = num_layers, T = num_timesteps captured, C = feature_dim) on a
    token grid, `num_side` side maps (concepts, + 1 for cross-attention) and `extra_channels` (DINOv3)."""
    t_used = num_timesteps if cfg.timesteps is None else len(cfg.timesteps)
    rates = tuple(sorted({max(1, round(r * grid[0] / 32)) for r in (6, 12, 18)}))  # DeepLabV3's at a 32-token grid
    head_cfg = HeadConfig(tasks=cfg.tasks, feature_dim=feature_dim, num_layers=num_layers, num_timesteps=t_used,
                          num_concepts=num_side, num_classes=num_classes, fusion=cfg.fusion if t_used > 1 else "mean",
                          aspp_rates=rates, extra_channels=extra_channels)
    return replace(head_cfg, **dict(cfg.head))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema ← decay · ema + (1 − decay) · model for parameters; buffers (norm statistics) are copied."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


class LossWeights:
    """The weighted sum of a multi-task head's losses, the weights calibrated early (module docstring)."""

    def __init__(self, cfg: TrainConfig):
        self.tasks, self.steps = cfg.tasks, cfg.calibration_steps
        self.weights = dict(cfg.loss_weights) or dict.fromkeys(cfg.tasks, 1.0)
        self.fixed = bool(cfg.loss_weights) or len(cfg.tasks) == 1
        self.sums, self.count = dict.fromkeys(cfg.tasks, 0.0), 0

    def __call__(self, losses: dict[str, torch.Tensor], acc) -> torch.Tensor:
        if not self.fixed and self.count < self.steps:
            # the same weights on every rank: the ranks' losses averaged (a sync per step, for these steps only)
            mean = acc.reduce(torch.stack([losses[t].detach() for t in self.tasks]), reduction="mean")
            self.count += 1
            for t, v in zip(self.tasks, mean.tolist()):
                self.sums[t] += v
            avg = {t: self.sums[t] / self.count for t in self.tasks}
            typical = sum(avg.values()) / len(avg)
            self.weights = {t: typical / max(avg[t], 1e-8) for t in self.tasks}
        return sum(self.weights[t] * losses[t] for t in self.tasks)

    def state(self) -> dict:
        return {"weights": self.weights, "sums": self.sums, "count": self.count}

    def load(self, state: dict) -> None:
        if state and not self.fixed:
            self.weights, self.sums, self.count = dict(state["weights"]), dict(state["sums"]), int(state["count"])


def _dino(use: bool, batch: dict) -> torch.Tensor | None:
    if use and "dino" not in batch:
        raise ValueError("the cache has no DINOv3 maps: extract it with --dino PATH")
    return batch["dino"] if use else None


def train_head(cache: FeatureSource, cfg: TrainConfig, out: Path, *, classes: list[str],
               palette: list | None = None, eval_cache: FeatureSource | None = None,
               depth_unit: str = "", save_every: int = 0) -> dict:
    """Train, evaluate the EMA weights on `eval_cache` (if given) and write out (safetensors head file). Features
    come from a cache, or from the backbone batch by batch (`LiveFeatures`).

    Resumes from the hidden state file beside `out` (.NAME.state.safetensors), saved after every epoch and, with
    `save_every`, every that many steps within one (a resumed epoch skips the batches it had done). Returns the metrics
    (on the main process; evaluation runs there only, and the others return {}).
    """
    from accelerate import Accelerator

    acc = Accelerator(cpu=not torch.cuda.is_available())  # without cpu=True, CPU workers would not form a group
    out = Path(out)
    classes_task = class_task(cfg.tasks)
    num_classes = len(classes) if classes_task else 1
    missing = [t for t in cfg.tasks if t not in cache.manifest.get("labels", [])]
    if missing:
        raise ValueError(f"the cache at {cache.root} has no {', '.join(missing)} labels")
    model = build_head(cache, cfg, num_classes)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW([
        {"params": model.aggregators.parameters(), "lr": cfg.lr},
        {"params": model.decoders.parameters(), "lr": cfg.lr * cfg.decoder_lr_scale},
    ], weight_decay=cfg.weight_decay)
    model, opt = acc.prepare(model, opt)
    state_path = out.with_name(f".{out.stem}.state.safetensors")  # hidden, git-ignored: resumable per-epoch state
    start = skip = 0
    weights = LossWeights(cfg)
    settings = {k: v for k, v in asdict(cfg).items() if k != "epochs"}  # more epochs may extend a run
    if state_path.is_file():
        st = load_state(state_path)  # never unpickles: a planted or damaged file is refused with one line
        changed = sorted(k for k, v in st.get("settings", settings).items() if settings.get(k) != v)
        if changed:
            raise ValueError(f"{state_path} is a run with other settings ({', '.join(changed)}): "
                             "train with them again, or delete it to start over")
        try:
            acc.unwrap_model(model).load_state_dict(upgrade_keys(st["model"], cfg.tasks[0]))
            ema.load_state_dict(upgrade_keys(st["ema"], cfg.tasks[0]))
            opt.load_state_dict(st["opt"])
        except (RuntimeError, ValueError, KeyError) as e:  # torch lists every key: one line is enough
            raise ValueError(f"{state_path} does not fit this head ({str(e).splitlines()[0].rstrip(':')}): "
                             "delete it to start over") from None
        start, skip = st["epoch"], st.get("batch", 0)
        weights.load(st.get("loss_weights", {}))
        if "rng" in st:  # dropout draws on: a resumed run goes on as the uninterrupted one would
            torch.set_rng_state(st["rng"])
        if "cuda_rng" in st and acc.device.type == "cuda":
            torch.cuda.set_rng_state(st["cuda_rng"], acc.device)
    ema.to(acc.device)
    grid, size = cache.grid, cache.image_size
    gen = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = cache.num_batches(cfg.batch_size, acc.num_processes)  # the same on every rank

    def save(epoch: int, done: int) -> None:  # done: batches of `epoch` finished (0: the epoch is whole)
        if acc.is_main_process:
            out.parent.mkdir(parents=True, exist_ok=True)
            save_state(state_path, {"model": acc.unwrap_model(model).state_dict(), "ema": ema.state_dict(),
                                    "opt": opt.state_dict(), "epoch": epoch, "batch": done,
                                    "loss_weights": weights.state(), "settings": settings,
                                    "rng": torch.get_rng_state()}
                       | ({"cuda_rng": torch.cuda.get_rng_state(acc.device)} if acc.device.type == "cuda" else {}))

    for epoch in range(start, cfg.epochs):
        gen.manual_seed(cfg.seed + epoch)
        model.train()
        t0, total, n = time.time(), torch.zeros((), device=acc.device), 0
        batches = cache.batches(cfg.batch_size, shuffle=True, generator=gen, rank=acc.process_index,
                                world_size=acc.num_processes, device=acc.device, skip=skip)
        for i, batch in enumerate(batches, start=skip):
            pred = run_head(model, cfg.side, batch, grid, size, timesteps=cfg.timesteps, extra=_dino(cfg.dino, batch),
                            source="the cache")
            losses = {t: LOSSES[get_task(t).kind](pred[t].float(), batch[t]) for t in cfg.tasks}  # {task: ()}
            loss = weights(losses, acc)
            opt.zero_grad(set_to_none=True)
            acc.backward(loss)
            opt.step()
            step = epoch * steps_per_epoch + i
            # EMA warm-up: early weights must not dominate short runs.
            ema_update(ema, acc.unwrap_model(model), min(cfg.ema, (1 + step) / (10 + step)))
            total, n = total + loss.detach(), n + 1  # no device sync per step: read once per epoch
            if save_every and (i + 1) % save_every == 0 and i + 1 < steps_per_epoch:
                save(epoch, i + 1)  # an epoch of `distill` is a whole generation run: keep its progress
        skip = 0
        mean = acc.reduce((total / max(n, 1)).reshape(1), reduction="mean").item()
        if acc.is_main_process:
            print(f"[{'+'.join(cfg.tasks)}] epoch {epoch + 1}/{cfg.epochs} loss {mean:.4f} "
                  f"({steps_per_epoch} steps, {time.time() - t0:.1f} s)", file=sys.stderr, flush=True)
        save(epoch + 1, 0)
        acc.wait_for_everyone()
    metrics = {}
    if eval_cache is not None and acc.is_main_process:  # the others are done: no barrier to time out on
        by_task = evaluate_head(ema, cfg.side, cfg.timesteps, eval_cache, classes)
        metrics = by_task[cfg.tasks[0]] if len(cfg.tasks) == 1 else by_task  # one task's head: its metrics
    if acc.is_main_process:
        spec = cache.spec
        idx = list(range(len(spec.sigmas))) if cfg.timesteps is None else list(cfg.timesteps)
        meta = HeadMeta(
            config=ema.config, backbone=cache.manifest["backbone"], layers=list(cache.layers), blocks=spec.blocks,
            sigmas=[spec.sigmas[i] for i in idx], concepts=list(spec.concepts) if reads_concepts(cfg.side) else [],
            classes=list(classes) if classes_task else [], palette=[list(p) for p in (palette or [])],
            metrics={**metrics, "train": cache.record | {"samples": len(cache), "steps": cfg.epochs * steps_per_epoch,
                                                         "config": asdict(cfg)}
                     | ({"eval": eval_cache.record | {"samples": len(eval_cache)}} if eval_cache is not None else {})
                     | ({"loss_weights": weights.weights} if len(cfg.tasks) > 1 else {})},
            depth_unit=depth_unit, side=cfg.side, dino=cache.manifest.get("dino", {}) if cfg.dino else {},
        )
        save_head(out, ema, meta)
    return metrics
