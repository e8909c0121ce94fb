"""Heads without a labelled dataset (`mmdiff-gen distill`): prompts are generated batch by batch with capture, a
teacher labels the decoded images, and each batch's features and labels make a training step — nothing is stored.

`GeneratedFeatures` is a feature source like a cache (`train.feature_cache`), so `train_head` trains on it
unchanged: the same losses, EMA, resume (within an epoch too: `save_every`) and process groups (each rank
generates its share of every global batch). An epoch is one pass over the planned samples; a later epoch generates
the same images again (each sample's seed is fixed), as a cache would serve them again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ..backbones.base import Backbone
from ..capture import CaptureSpec, generate
from ..heads.inputs import reads_cross
from ..io.datasets import voc_palette
from ..tasks import get as get_task
from ..train.feature_cache import FeatureSource, batch_picks, joined, source_manifest
from ..train.trainer import TrainConfig, train_head
from .dataset_job import check_size
from .plan import plan_samples


class Labeller(Protocol):
    """What a teacher offers: `backbones.teacher.Teacher` (transformers models) or the toy's oracle."""

    tasks: tuple[str, ...]
    classes: list[str]
    depth_unit: str

    def identity(self) -> dict: ...

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]: ...


class GeneratedFeatures(FeatureSource):
    """Generated images' captured features and a teacher's labels of them, one generation pass per batch.

    Args:
        backbone: the loaded backbone.
        prompts: the prompts; each gives `images_per_prompt` samples seeded as `generate` seeds them
            (`plan.plan_samples`).
        teacher: labels the decoded uint8 images (its tasks are the labels; its classes the head's).
        spec: what to capture.
        seed: the run's seed.
        sampling: `generate`'s sampling settings (None: the backbone's recommendation).
        generate_batch_size: images per generation pass (default: the training batch): bounds activation memory.
    """

    def __init__(self, backbone: Backbone, prompts: Sequence[str], teacher: Labeller, spec: CaptureSpec, *,
                 images_per_prompt: int = 1, seed: int = 0, sampling: dict | None = None,
                 generate_batch_size: int | None = None):
        if not prompts or images_per_prompt < 1:
            raise ValueError("distillation needs at least one prompt and one image per prompt")
        self.backbone, self.teacher = backbone, teacher
        self.kw = backbone.sampling_kwargs(**(sampling or {}))
        check_size(backbone, self.kw["height"], self.kw["width"])
        self.samples = plan_samples(list(prompts), images_per_prompt, seed)
        self.generate_batch_size = generate_batch_size
        classes = list(teacher.classes)
        self.manifest = source_manifest(backbone, spec, (self.kw["height"], self.kw["width"]), count=len(self.samples),
                                        labels=teacher.tasks, classes=classes,
                                        palette=getattr(teacher, "palette", None) or voc_palette(len(classes)))
        self.root = "generated"
        self.record = {"data": f"generated: {len(prompts)} prompts × {images_per_prompt}, labelled by "
                               f"{teacher.identity()['name']}", "distilled": {
            "teacher": teacher.identity(), "prompts": len(prompts), "images_per_prompt": images_per_prompt,
            "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16], "seed": seed,
            "sampling": {k: v for k, v in self.kw.items() if isinstance(v, (int, float, str, type(None)))}}}

    def batches(self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None,
                rank: int = 0, world_size: int = 1, device: torch.device | str | None = None, skip: int = 0
                ) -> Iterator[dict[str, torch.Tensor]]:
        """As `FeatureCache.batches`, each batch generated (in passes of `generate_batch_size`) and labelled."""
        step = self.generate_batch_size or batch_size
        for picks in batch_picks([range(len(self))], batch_size, shuffle, generator, rank, world_size, skip):
            idx = [i for _, i in picks]
            yield joined([self._generate(idx[a : a + step]) for a in range(0, len(idx), step)], device)

    def _generate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        samples = [self.samples[i] for i in idx]
        gen = generate(self.backbone, [s.prompt for s in samples], self.spec, seeds=[s.seed for s in samples],
                       output_type="np", **self.kw)
        images = (gen.images * 255).round().astype(np.uint8)  # (B, H, W, 3): what a dataset would store
        cap = gen.capture
        out = {"features": cap.features, "index": torch.tensor(idx, dtype=torch.int64)}
        for name in ("concept_maps", "cross_attention"):
            if getattr(cap, name) is not None:
                out[name] = getattr(cap, name)
        for task, labels in self.teacher(images).items():
            out[task] = torch.from_numpy(np.ascontiguousarray(labels).astype(get_task(task).label_dtype))
        return out  # features stay where the backbone made them (the training device)


def distill(backbone: Backbone, prompts: Sequence[str], teacher: Labeller, cfg: TrainConfig, out: Path, *,
            images_per_prompt: int = 1, seed: int = 0, sampling: dict | None = None,
            eval_source: FeatureSource | None = None, save_every: int = 50,
            generate_batch_size: int | None = None) -> dict:
    """Train the head `cfg` describes on generated images labelled by `teacher`; write it to `out`, scored on
    `eval_source` when given (a labelled dataset's features). Resumable every `save_every` steps. Returns the
    metrics."""
    missing = [t for t in cfg.tasks if t not in teacher.tasks]
    if missing:
        raise ValueError(f"the teacher {teacher.identity()['name']} labels {', '.join(teacher.tasks)}, not "
                         f"{', '.join(missing)}")
    spec = CaptureSpec.for_tasks(cfg.tasks, cross_attention=reads_cross(cfg.side))
    source = GeneratedFeatures(backbone, prompts, teacher, spec, images_per_prompt=images_per_prompt, seed=seed,
                               sampling=sampling, generate_batch_size=generate_batch_size)
    unit = teacher.depth_unit if any(get_task(t).kind == "positive" for t in cfg.tasks) else ""
    return train_head(source, cfg, out, classes=source.manifest["classes"], palette=source.manifest["palette"],
                      eval_cache=eval_source, depth_unit=unit, save_every=save_every)
