"""The consistency protocol (MMDiff Table 1) on the toy world: heads' labels of generated images against
the oracle's labels of the same pixels.

Fresh captions (seeds no training scene uses) → one generation pass with capture → the heads' seg,
saliency and depth → compared with what the pixel-space oracle reads from the generated image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..backbones import load_backbone
from ..capture import generate
from ..jobs.annotate import Annotator, head_files
from ..train.metrics import DepthMetrics, SaliencyMetrics, SegMetrics
from .oracle import Oracle
from .world import CLASSES, render_scene

CONSISTENCY_SEED = 7_500_000  # caption scenes; disjoint from training, held-out and fidelity seeds
TASKS = ["seg", "saliency", "depth"]


@torch.no_grad()
def run_consistency(heads: Path, n: int = 200, batch_size: int = 25, model: str = "toy") -> dict:
    """Metrics of the heads against the oracle on n generated images (1–3 objects per caption)."""
    bb = load_backbone(model, dtype=torch.float32, device="cpu")
    ann = Annotator(head_files(Path(heads), TASKS), bb.identity())
    oracle = Oracle.from_checkpoint()
    kw = bb.sampling_kwargs()
    size = (kw["height"], kw["width"])
    seg, sal, dep = SegMetrics(len(CLASSES)), SaliencyMetrics(), DepthMetrics()
    captions = [render_scene(CONSISTENCY_SEED + i).caption for i in range(n)]
    for i in range(0, n, batch_size):
        batch = captions[i : i + batch_size]
        gen = generate(bb, batch, ann.spec(), seeds=[CONSISTENCY_SEED + j for j in range(i, i + len(batch))],
                       output_type="np", **kw)
        images = (gen.images * 255).round().astype(np.uint8)  # (B, H, W, 3), what a dataset would store
        ours = {k: v.numpy() for k, v in ann(gen.capture, size).items()}
        ref = oracle.predict(images)
        for j in range(len(batch)):
            seg.update(ours["seg"][j], ref["seg"][j])
            sal.update(ours["saliency"][j], np.where(ref["saliency"][j] >= 128, 255, 0).astype(np.uint8))
            dep.update(ours["depth"][j], ref["depth"][j])
    return {"n": n, "seg": seg.result(), "saliency": sal.result(), "depth": dep.result()}
