"""The toy video backbone's heads: one multi-task head (seg + saliency + depth, the unified decoder of MMDiff App. C)
trained on its real-video features of toy-world clips with their exact per-frame labels, then scored on held-out
clips per frame and for temporal consistency (label flicker, `video_world.label_flicker`, against the exact labels').

Features come from real-video mode (`capture.extract`: each clip encoded, noised to every capture sigma, one forward),
as the image toy's heads come from real-image mode; the head reads each latent frame as an image, optionally mixes
neighbouring latent frames (`HeadConfig.frame_mixing`), and its outputs are spread over the decoded frames
(`heads.frames.to_frames`) before the losses, which are the image heads' (`train.losses`), per decoded frame.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch

from ..backbones.base import Backbone
from ..backbones.loading import DEFAULT_HEADS
from ..capture import PAPER_SIGMAS, CaptureSpec, extract
from ..heads.checkpoint import HeadMeta, save_head
from ..heads.frames import to_frames
from ..heads.inputs import head_inputs
from ..heads.model import HeadConfig, MMDiffHead, predictions
from ..tasks import get as get_task
from ..train.losses import LOSSES
from ..train.metrics import DepthMetrics, SaliencyMetrics, SegMetrics
from ..train.trainer import ema_update
from ._loop import Progress
from .video_world import label_flicker, render_clip
from .world import CLASSES, PALETTE

TASKS = ("seg", "saliency", "depth")
TRAIN_SEED, HELD_OUT_SEED = 8_000_000, 9_000_000  # far from the backbone's training clips (0 …)
ASSET_DIR = DEFAULT_HEADS["toy-video"]  # the shipped heads folder


def clip_batch(seeds: range, frames: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[str]]:
    """Clips of the toy video world: (B, F, 3, 64, 64) in [0, 1], exact labels {task: (B, F, 64, 64)}, captions."""
    clips = [render_clip(s, frames=frames) for s in seeds]
    video = torch.from_numpy(np.stack([c.frames for c in clips])).permute(0, 1, 4, 2, 3).float() / 255
    labels = {"seg": torch.from_numpy(np.stack([c.seg for c in clips])),
              "saliency": torch.from_numpy(np.stack([c.saliency for c in clips])),
              "depth": torch.from_numpy(np.stack([c.depth for c in clips]))}
    return video, labels, [c.caption for c in clips]


def spec_for(backbone: Backbone) -> CaptureSpec:
    concepts = tuple(dict.fromkeys(w for t in TASKS for w in get_task(t).concepts))
    return CaptureSpec(layers=backbone.default_layers(), sigmas=PAPER_SIGMAS, concepts=concepts,
                       store_dtype="bfloat16")


@torch.no_grad()
def features(backbone: Backbone, seeds: range, frames: int, batch: int = 16) -> dict:
    """Real-video features of the clips `seeds` (bf16, CPU) with their labels: what the head trains on."""
    spec, feats, maps, labels = spec_for(backbone), [], [], {t: [] for t in TASKS}
    grid = None
    for i in range(seeds.start, seeds.stop, batch):
        video, lab, captions = clip_batch(range(i, min(i + batch, seeds.stop)), frames)
        res = extract(backbone, video, spec, captions=captions, seeds=list(range(i, i + len(captions))))
        feats.append(res.features.cpu())
        maps.append(res.concept_maps.to(torch.bfloat16).cpu())
        grid = res.grid
        for t in TASKS:
            labels[t].append(lab[t])
    return {"features": torch.cat(feats), "concept_maps": torch.cat(maps), "grid": grid, "spec": spec,
            "labels": {t: torch.cat(v) for t, v in labels.items()}, "frames": frames}


def train_video_heads(backbone: Backbone, out: Path | None = None, *, clips: int = 1200, held_out: int = 200,
                      frames: int = 9, steps: int = 800, batch: int = 4, lr: float = 1e-3, frame_mixing: int = 3,
                      seed: int = 0) -> dict:
    """Train the unified head, score it on `held_out` clips and write it (with its metrics) to `out`/unified.safetensors
    (default: the packaged toy-video heads). Returns the metrics."""
    data = features(backbone, range(TRAIN_SEED, TRAIN_SEED + clips), frames)
    spec = data["spec"]
    torch.manual_seed(seed)
    cfg = HeadConfig(tasks=TASKS, feature_dim=backbone.feature_dim, num_layers=len(spec.layers),
                     num_timesteps=len(spec.sigmas), num_concepts=len(spec.concepts), num_classes=len(CLASSES),
                     decoder_channels=32, frame_mixing=frame_mixing)  # the image toy heads' decoder width
    model = MMDiffHead(cfg)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(seed)
    losses, progress = [], Progress("video-heads", steps)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, clips, (batch,), generator=gen)
        out_ = _forward(model, data, idx)
        loss = sum(LOSSES[get_task(t).kind](out_[t], data["labels"][t][idx].flatten(0, 1)) for t in TASKS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema_update(ema, model, 0.99 if step > steps // 10 else 0.0)
        losses.append(loss.item())
        progress.update(step, losses[-1])
    metrics = evaluate(backbone, ema, range(HELD_OUT_SEED, HELD_OUT_SEED + held_out), frames)
    metrics["train"] = {"clips": clips, "steps": steps, "batch": batch, "frames": frames,
                        "frame_mixing": frame_mixing, "final_loss": float(np.mean(losses[-50:]))}
    meta = HeadMeta(config=cfg, backbone=backbone.identity(), layers=list(spec.layers), sigmas=list(spec.sigmas),
                    concepts=list(spec.concepts), classes=list(CLASSES), palette=[list(c) for c in PALETTE],
                    depth_unit="metre", metrics=metrics)
    out = Path(out) if out is not None else ASSET_DIR
    out.mkdir(parents=True, exist_ok=True)
    save_head(out / "unified.safetensors", ema, meta)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def _forward(model: MMDiffHead, data: dict, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """{task: (B·F, ch, H, W)} per decoded frame for the clips `idx` of `data`."""
    feats, side = head_inputs(data["features"][idx].float(), data["grid"], None, data["concept_maps"][idx].float())
    out = model(feats, data["grid"], (64, 64), concepts=side)
    return {t: to_frames(x, data["frames"]).flatten(0, 1) for t, x in out.items()}


@torch.no_grad()
def evaluate(backbone: Backbone, model: MMDiffHead, seeds: range, frames: int) -> dict:
    """Per-frame metrics on held-out clips and the label flicker of predictions against the exact labels'."""
    data = features(backbone, seeds, frames)
    model.eval()
    preds = {t: [] for t in TASKS}
    for i in range(0, len(seeds), 16):
        idx = torch.arange(i, min(i + 16, len(seeds)))
        out = _forward(model, data, idx)
        for t in TASKS:
            preds[t].append(predictions(t, out[t]).unflatten(0, (len(idx), frames)).numpy())
    pred = {t: np.concatenate(v) for t, v in preds.items()}  # (N, F, H, W)
    truth = {t: data["labels"][t].numpy() for t in TASKS}
    return frame_metrics(pred, truth) | {
        "flicker": {"predicted": float(np.mean([label_flicker(x) for x in pred["seg"]])),
                    "exact": float(np.mean([label_flicker(x) for x in truth["seg"]]))},
        "held_out": {"clips": len(seeds), "frames": frames, "seeds_from": seeds.start}}


def frame_metrics(pred: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict:
    """Every frame of label stacks (N, F, H, W) against the reference's: {"seg", "saliency", "depth": metrics}."""
    meters = {"seg": SegMetrics(len(CLASSES)), "saliency": SaliencyMetrics(), "depth": DepthMetrics()}
    for task, meter in meters.items():
        for p, r in zip(pred[task].reshape(-1, *pred[task].shape[2:]), ref[task].reshape(-1, *ref[task].shape[2:])):
            meter.update(p, r)
    return {task: meter.result() for task, meter in meters.items()}
