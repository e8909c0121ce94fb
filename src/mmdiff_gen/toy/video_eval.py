"""What the toy video backbone and its heads are worth, on fresh captions of the toy video world.

Generated clips have no exact labels, so the image toy's independent pixel-space oracle (`toy.oracle`, trained on
renders and VAE reconstructions of the same world) labels every generated frame: the pseudo-ground-truth of MMDiff's
Table 1 protocol, per frame.

- Prompt fidelity: frame 0 holds every prompted object with its class and colour in its place (the image toy's judge,
  `toy.fidelity.judge`), and each object's motion shows: over the clip, a sideways mover's oracle mask moves its way
  by at least `MIN_SHIFT` px, a still one by less, one coming closer (moving away) grows (shrinks) by `MIN_GROWTH`.
  The judge's ceiling is the same check on the world's own renders of the same captions.
- Per-frame label quality: the video heads' labels against the oracle's, every frame (mIoU, saliency, depth).
- Temporal consistency: label flicker (`video_world.label_flicker`) of the video heads' segmentation, of the per-frame
  baseline — the image toy backbone and its shipped heads run on each decoded frame alone (real-image mode) — and of
  the oracle's; the world's exact flicker on the renders is the reference for how much the labels should change.
"""

from __future__ import annotations

import numpy as np
import torch

from ..backbones import load_backbone
from ..backbones.loading import DEFAULT_HEADS
from ..capture import generate
from ..jobs.annotate import build_annotator, plan_annotator
from .fidelity import judge
from .oracle import Oracle
from .video_heads import frame_metrics
from .video_world import Clip, label_flicker, render_clip
from .world import CLASSES

CAPTION_SEED, GEN_SEED = 7_500_000, 8_500_000  # fresh layouts and sampling noise: far from every training seed
MIN_SHIFT = 4.0  # px of centroid travel that counts as moving sideways (movers travel 12–28 px)
MIN_GROWTH = 1.1  # area ratio that counts as coming closer (its inverse: moving away)


def motion_read(seg: np.ndarray, clip: Clip) -> list[bool]:
    """Per object of `clip`: whether the oracle's masks (F, H, W) show its motion over the clip, read from the pixels
    of its class in the first and last frames (a clip naming one class twice reads both objects together)."""
    out = []
    for mover in clip.objects:
        cid = CLASSES.index(mover.start.shape)
        a, b = seg[0] == cid, seg[-1] == cid
        if a.sum() < 20 or b.sum() < 20:
            out.append(False)
            continue
        shift = np.nonzero(b)[1].mean() - np.nonzero(a)[1].mean()
        growth = b.sum() / a.sum()
        ok = {"right": shift >= MIN_SHIFT, "left": shift <= -MIN_SHIFT, "still": abs(shift) < MIN_SHIFT,
              "closer": growth >= MIN_GROWTH, "away": growth <= 1 / MIN_GROWTH}[mover.motion]
        out.append(bool(ok))
    return out


def _fidelity(frames: np.ndarray, segs: np.ndarray, clips: list[Clip]) -> dict:
    """Fractions of clips whose frame-0 layout, motion, and both are right (frames (N, F, H, W, 3), segs (N, F, H, W))."""
    layout = [judge(f[0], s[0], c.pose(0)).ok for f, s, c in zip(frames, segs, clips)]
    motion = [all(motion_read(s, c)) for s, c in zip(segs, clips)]
    return {"layout": float(np.mean(layout)), "motion": float(np.mean(motion)),
            "both": float(np.mean([a and b for a, b in zip(layout, motion)]))}


def _quality(pred: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict:
    """Per-frame agreement of label stacks (N, F, H, W) with the reference's."""
    m = frame_metrics(pred, ref)
    return {"seg_miou": m["seg"]["miou"], "saliency": m["saliency"], "depth": m["depth"]}


@torch.no_grad()
def run_video_eval(model: str = "toy-video", heads=None, n: int = 100, batch_size: int = 10, **sampling) -> dict:
    """The figures above on `n` fresh captions, sampled at the backbone's settings (`sampling` overrides them; the
    world's clips are 64×64)."""
    bb = load_backbone(model, dtype=torch.float32, device="cpu")
    files, _ = plan_annotator(model, ["seg", "saliency", "depth"], heads)
    ann = build_annotator(bb, files)
    s = bb.sampling_kwargs(**sampling)
    if (s["height"], s["width"]) != (64, 64):
        raise ValueError(f"the toy video world is 64×64, not {s['height']}×{s['width']}")
    frames = s["num_frames"]
    clips = [render_clip(CAPTION_SEED + i, frames=frames) for i in range(n)]
    video, labels = [], {t: [] for t in ("seg", "saliency", "depth")}
    for i in range(0, n, batch_size):
        part = clips[i : i + batch_size]
        gen = generate(bb, [c.caption for c in part], ann.spec(), seeds=[GEN_SEED + i + j for j in range(len(part))],
                       output_type="pil", **s)
        video.append(np.stack([np.stack([np.asarray(f.convert("RGB")) for f in clip]) for clip in gen.images]))
        a = ann(gen.capture, (64, 64))
        for t in labels:
            labels[t].append(a.labels[t].numpy())
    video = np.concatenate(video)  # (N, F, 64, 64, 3)
    ours = {t: np.concatenate(v) for t, v in labels.items()}
    oracle = Oracle.from_checkpoint()
    flat = oracle.predict(video.reshape(-1, *video.shape[2:]))
    ref = {t: v.reshape(n, frames, *v.shape[1:]) for t, v in flat.items()}
    renders = np.stack([c.frames for c in clips])
    render_segs = oracle.predict(renders.reshape(-1, *renders.shape[2:]))["seg"].reshape(n, frames, 64, 64)
    baseline = per_frame_baseline(video, [c.caption for c in clips], batch_size)
    return {
        "model": model, "n": n, "frames": frames, "sampling": s,
        "fidelity": {"generated": _fidelity(video, ref["seg"], clips),
                     "ceiling_renders": _fidelity(renders, render_segs, clips)},
        "labels_vs_oracle": {"video_heads": _quality(ours, ref), "per_frame_baseline": _quality(baseline, ref)},
        "flicker": {"video_heads": float(np.mean([label_flicker(s) for s in ours["seg"]])),
                    "per_frame_baseline": float(np.mean([label_flicker(s) for s in baseline["seg"]])),
                    "oracle": float(np.mean([label_flicker(s) for s in ref["seg"]])),
                    "exact_on_renders": float(np.mean([label_flicker(c.seg) for c in clips]))},
    }


@torch.no_grad()
def per_frame_baseline(video: np.ndarray, captions: list[str], batch_size: int) -> dict[str, np.ndarray]:
    """The image toy backbone and its shipped heads on every frame alone (real-image mode, the clip's caption):
    label stacks (N, F, H, W)."""
    from ..capture import extract

    bb = load_backbone("toy", dtype=torch.float32, device="cpu")
    files, _ = plan_annotator("toy", ["seg", "saliency", "depth"], DEFAULT_HEADS["toy"])
    ann = build_annotator(bb, files)
    n, f = video.shape[:2]
    images = torch.from_numpy(video.reshape(-1, *video.shape[2:])).permute(0, 3, 1, 2).float() / 255
    texts = [c for c in captions for _ in range(f)]
    out = {t: [] for t in ("seg", "saliency", "depth")}
    step = batch_size * f
    for i in range(0, len(images), step):
        cap = extract(bb, images[i : i + step], ann.spec(), captions=texts[i : i + step],
                      seeds=[GEN_SEED + (i + j) // f for j in range(len(images[i : i + step]))])
        a = ann(cap, (64, 64))
        for t in out:
            out[t].append(a.labels[t].numpy())
    return {t: np.concatenate(v).reshape(n, f, *v[0].shape[1:]) for t, v in out.items()}


def run_video_probe(model: str = "toy-video", n: int = 64, sigmas=(0.9, 0.78, 0.65, 0.52, 0.39, 0.26, 0.13),
                    batch_size: int = 8, frames: int | None = None) -> dict:
    """MMDiff Fig. 5 on the toy video backbone: every block × sigma scored as zero-shot segmentation (its per-token
    cross-attention, openseg's rule) on `n` clips of the world, every frame against the exact labels."""
    from types import SimpleNamespace

    from ..jobs.probe import probe_layers

    bb = load_backbone(model, dtype=torch.float32, device="cpu")
    frames = frames or bb.sampling_kwargs()["num_frames"]
    clips = [render_clip(CAPTION_SEED + 10_000 + i, frames=frames) for i in range(n)]
    samples = [SimpleNamespace(key=f"{i}", image=c.frames, caption=c.caption, labels={"seg": c.seg})
               for i, c in enumerate(clips)]
    res = probe_layers(bb, samples, list(CLASSES), sigmas=sigmas, batch_size=batch_size)
    res["miou"] = res["miou"].tolist()
    return res
