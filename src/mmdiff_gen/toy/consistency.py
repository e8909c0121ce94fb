"""The consistency protocol (MMDiff Table 1) on the toy world: heads' labels of generated images against
the oracle's labels of the same pixels.

Fresh captions (seeds no training scene uses) → one generation pass with capture → the heads' seg,
saliency and depth, and the zero-shot openseg → compared with what the pixel-space oracle reads from
the generated image. The per-sample quality scores are checked the same way: keeping only the
best-scored samples should raise the segmentation consistency (`quality_filter`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..backbones import load_backbone
from ..capture import generate
from ..jobs.annotate import build_annotator, head_files
from ..tasks import get as get_task
from ..train.evaluate import METRICS
from ..train.metrics import SegMetrics
from .oracle import OracleTeacher
from .world import CLASSES, render_scene

CONSISTENCY_SEED = 7_500_000  # caption scenes; disjoint from training, held-out and fidelity seeds
TASKS = ["seg", "saliency", "depth"]


@torch.no_grad()
def run_consistency(heads: Path | None, n: int = 200, batch_size: int = 25, model: str = "toy",
                    keep: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25), grounding: dict | None = None,
                    tasks: tuple[str, ...] = tuple(TASKS), lora: Path | None = None, lora_scale: float = 1.0,
                    steps: int | None = None) -> dict:
    """Metrics of the heads of `tasks` (and openseg) against the oracle on n generated images (1–3 objects per
    caption), and the seg consistency of the best-scored `keep` fractions under each quality signal.

    `grounding` overrides openseg's layer / sigma / threshold (default: the backbone's); `lora` is loaded into the
    backbone (`tasks=()`: openseg alone, no heads); `steps`: sampling steps (default: the backbone's)."""
    bb = load_backbone(model, dtype=torch.float32, device="cpu", lora=lora, lora_scale=lora_scale)
    ann = build_annotator(bb, head_files(Path(heads), list(tasks)) if tasks else {}, list(CLASSES), grounding)
    oracle = OracleTeacher()  # the oracle's labels as renders hold them (saliency: its 0 / 255 mask)
    kw = bb.sampling_kwargs(num_inference_steps=steps)
    size = (kw["height"], kw["width"])
    meters = {t: METRICS[get_task(t).kind](len(CLASSES)) for t in (*tasks, "openseg")}
    captions = [render_scene(CONSISTENCY_SEED + i).caption for i in range(n)]
    pairs, quality = [], []  # per sample: (heads' seg, oracle's seg), quality record
    for i in range(0, n, batch_size):
        batch = captions[i : i + batch_size]
        gen = generate(bb, batch, ann.spec(), seeds=[CONSISTENCY_SEED + j for j in range(i, i + len(batch))],
                       output_type="np", **kw)
        images = (gen.images * 255).round().astype(np.uint8)  # (B, H, W, 3), what a dataset would store
        a = ann(gen.capture, size, prompts=batch)
        ours = {k: v.numpy() for k, v in a.labels.items()}
        ref = oracle(images)
        ref["openseg"] = ref["seg"]
        for t, m in meters.items():
            for j in range(len(batch)):
                m.update(ours[t][j], ref[t][j])
        if "seg" in tasks:
            pairs += [(ours["seg"][j], ref["seg"][j]) for j in range(len(batch))]
        quality += a.quality
    return {"n": n, **{t: m.result() for t, m in meters.items() if t != "openseg"},
            "openseg": {**meters["openseg"].result(), **ann.openseg.to_dict()},
            "quality_filter": quality_filter(pairs, quality, keep) if pairs else []}


def quality_filter(pairs: list[tuple[np.ndarray, np.ndarray]], quality: list[dict], keep: tuple[float, ...]) -> list:
    """Seg mIoU over the top `keep` fraction of samples ranked by each quality signal (ties by index)."""
    rows = []
    for signal in quality[0]:
        scores = np.array([q[signal] for q in quality], dtype=np.float64)
        order = np.argsort(-scores, kind="stable")
        for frac in keep:
            k = max(1, round(frac * len(pairs)))
            m = SegMetrics(len(CLASSES))
            for i in order[:k]:
                m.update(*pairs[i])
            rows.append({"signal": signal, "keep": frac, "kept": k, "min_score": float(scores[order[k - 1]]),
                         "seg_miou": m.result()["miou"]})
    return rows
