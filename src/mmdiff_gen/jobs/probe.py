"""`probe-layers`: which block's image→text attention segments best (Seg4Diff's "expert" layer).

Labelled images go through real-image mode once, recording the per-token attention of every
text-image block at every sigma; each (layer, sigma) is scored as zero-shot segmentation against
the ground truth (mIoU over the dataset, background included), at each background threshold.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from ..backbones.base import Backbone
from ..capture import CaptureSpec, extract
from ..heads.openseg import class_maps, segment
from ..train.feature_cache import check_one_size
from ..train.metrics import SegMetrics


def probe_layers(backbone: Backbone, samples, classes: Sequence[str], *, sigmas: Sequence[float],
                 thresholds: Sequence[float] = (0.3, 0.4, 0.5, 0.6), n: int | None = None, batch_size: int = 16,
                 seed: int = 0, on_batch=None) -> dict:
    """Score every (attention block, sigma, threshold) as zero-shot segmentation on `samples`.

    Args:
        backbone: the wrapped pipeline.
        samples: a dataset reader (Sample with image, seg and a caption naming the classes present).
        classes: class names, id i = classes[i], 0 = background.
        sigmas: the sigmas to probe.
        thresholds: background thresholds to try.
        n: use the first n samples (None: all).
    Returns:
        {"miou": array (L, T, R) of mIoU in percent, "layers", "sigmas", "thresholds", "best": {layer,
        sigma, threshold, miou}, "samples": count}.
    """
    layers = tuple(range(len(backbone.attention_blocks)))
    spec = CaptureSpec(layers=(0,), sigmas=tuple(sigmas), text_attention_layers=layers, store_dtype="float32",
                       store_device="cpu")
    sig = spec.sigmas  # noisiest first
    count = len(samples) if n is None else min(n, len(samples))
    meters = [[[SegMetrics(len(classes)) for _ in thresholds] for _ in sig] for _ in layers]
    named = 0  # samples whose caption names at least one class
    for start in range(0, count, batch_size):
        batch = [samples[i] for i in range(start, min(start + batch_size, count))]
        if any(x.seg is None for x in batch):
            raise ValueError("probe-layers needs segmentation labels")
        check_one_size(batch, batch[0].image.shape)
        top = max(int(np.where(x.seg == 255, 0, x.seg).max()) for x in batch)
        if top >= len(classes):
            raise ValueError(f"the labels hold class id {top} but {len(classes)} class names were given")
        captions = [x.caption for x in batch]
        res = extract(backbone, [Image.fromarray(x.image) for x in batch], spec, captions=captions,
                      seeds=[seed + start + i for i in range(len(batch))])
        positions = backbone.class_token_positions(captions, classes)
        named += sum(bool(p) for p in positions)
        size = batch[0].image.shape[:2]
        gts = [x.seg for x in batch]
        for li in range(len(layers)):
            for ti in range(len(sig)):
                maps = class_maps(res.text_attention[:, ti, li], positions, len(classes))
                for ri, tau in enumerate(thresholds):
                    ids, _ = segment(maps, res.grid, size, tau)
                    for p, g in zip(ids.numpy(), gts):
                        meters[li][ti][ri].update(p, g)
        if on_batch is not None:
            on_batch(len(batch))
    if named == 0:
        raise ValueError("no caption names any of the classes: the probe reads the attention of the class words "
                         "(give captions with --captions)")
    miou = np.array([[[m.result()["miou"] for m in row] for row in layer] for layer in meters])  # (L, T, R)
    li, ti, ri = np.unravel_index(np.nanargmax(miou), miou.shape)
    return {"miou": miou, "layers": list(layers), "sigmas": list(sig), "thresholds": list(thresholds),
            "best": {"layer": int(li), "sigma": float(sig[ti]), "threshold": float(thresholds[ri]),
                     "miou": float(miou[li, ti, ri])},
            "samples": count}


def describe_layer(backbone: Backbone, index: int) -> str:
    """A human name for an attention-block index (FLUX: double / single, SD3: joint)."""
    n_joint = len(backbone.joint_blocks)
    if index < n_joint:
        return f"{'double' if backbone.family == 'flux' else 'joint'} {index}"
    return f"single {index - n_joint}"
