"""Trained heads as one annotator: which capture they need, and label maps from what a pass captured."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..backbones.dino import DinoFeatures, images_tensor
from ..capture import CaptureResult, CaptureSpec
from ..heads.checkpoint import HeadMeta, HeadMismatch, load_head, read_meta
from ..heads.inputs import head_inputs
from ..heads.model import MMDiffHead, predictions

HEAD_FILES = {"seg": "seg.safetensors", "saliency": "saliency.safetensors", "depth": "depth.safetensors"}


def head_files(source: Path, tasks: list[str]) -> dict[str, Path]:
    """Head file per task from a heads folder (seg/saliency/depth.safetensors) or a single head file."""
    source = Path(source)
    if source.is_file():
        task = read_meta(source).config.task
        found = {task: source}
    elif source.is_dir():
        found = {t: source / f for t, f in HEAD_FILES.items() if (source / f).is_file()}
    else:
        raise HeadMismatch(f"heads not found: {source}")
    missing = [t for t in tasks if t not in found]
    if missing:
        raise HeadMismatch(f"{source} has no head for {', '.join(missing)} (it has: {', '.join(found) or 'none'})")
    return {t: found[t] for t in tasks}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class _Head:
    model: MMDiffHead
    meta: HeadMeta
    path: Path


class Annotator:
    """The heads of the requested tasks, checked against one backbone.

    Args:
        files: head file per task ("seg", "saliency", "depth").
        backbone: the backbone's identity(); a head trained on another backbone is refused.
        device: where the heads run (the backbone's device, so features never leave it).
        dino: the DINOv3 features, needed exactly when a head was trained with them.
    """

    def __init__(self, files: dict[str, Path], backbone: dict, device: str | torch.device = "cpu",
                 dino: DinoFeatures | None = None):
        self.heads: dict[str, _Head] = {}
        self.dino = dino
        for task, path in files.items():
            model, meta = load_head(path, backbone=backbone, device=device)
            if meta.config.task != task:
                raise HeadMismatch(f"{path} is a {meta.config.task} head, not a {task} head")
            if meta.dino and dino is None:
                raise HeadMismatch(f"the {task} head was trained with DINOv3 features ({meta.dino.get('name')}): "
                                   "pass --dino PATH")
            if meta.dino:
                dino.check(meta.dino, f"the {task} head")
            self.heads[task] = _Head(model, meta, Path(path))
        metas = [h.meta for h in self.heads.values()]
        # One capture serves every head: the union of their layers, sigmas and concepts.
        self.layers = tuple(sorted({i for m in metas for i in m.layers}))
        self.sigmas = tuple(sorted({s for m in metas for s in m.sigmas}, reverse=True))
        words: list[str] = []
        for m in metas:
            words += [w for w in m.concepts if w not in words]
        self.concepts = tuple(words)
        self.cross = any(m.side in ("cross", "both") for m in metas)

    @property
    def tasks(self) -> list[str]:
        return list(self.heads)

    def spec(self, store_dtype: str = "bfloat16") -> CaptureSpec:
        """What the generation pass must capture for these heads (kept on the backbone's device)."""
        return CaptureSpec(layers=self.layers, sigmas=self.sigmas, concepts=self.concepts,
                           cross_attention=self.cross, store_dtype=store_dtype)

    def identity(self) -> dict:
        """Per task: the file name and sha256, what it reads, and the metrics it reports."""
        return {t: {"file": h.path.name, "sha256": _sha256(h.path), "classes": h.meta.classes, "layers": h.meta.layers,
                    "sigmas": h.meta.sigmas, "concepts": h.meta.concepts, "side": h.meta.side,
                    "dino": h.meta.dino, "metrics": h.meta.metrics} for t, h in self.heads.items()}

    @property
    def classes(self) -> list[str]:
        return self.heads["seg"].meta.classes if "seg" in self.heads else []

    @property
    def palette(self) -> list[list[int]]:
        return self.heads["seg"].meta.palette if "seg" in self.heads else []

    @property
    def depth_unit(self) -> str:
        return self.heads["depth"].meta.depth_unit if "depth" in self.heads else ""

    @torch.no_grad()
    def __call__(self, cap: CaptureResult, size: tuple[int, int], images=None) -> dict[str, torch.Tensor]:
        """Label maps per task at `size` (H, W): seg (B, H, W) uint8 ids, saliency uint8 0–255, depth float metres.

        `images` (the generated PIL images) feed the DINOv3 features of heads trained with them."""
        out = {}
        extra = None
        if any(h.meta.dino for h in self.heads.values()):
            if images is None:
                raise ValueError("these heads read DINOv3 features of the images: pass the images")
            extra = self.dino(images_tensor(images), cap.grid)  # (B, E, h, w)
        for task, h in self.heads.items():
            m = h.meta
            feats = cap.features[:, [cap.layers.index(i) for i in m.layers]]  # (B, L_head, T, N, C)
            steps = list(m.timestep_indices(list(cap.target_sigmas)))
            cm = None
            if m.side in ("concepts", "both"):
                cm = cap.concept_maps[:, :, [cap.concepts.index(w) for w in m.concepts]]  # (B, T, K_head, N)
            ca = cap.cross_attention if m.side in ("cross", "both") else None
            feats, side = head_inputs(feats, cap.grid, steps, cm, ca)
            pred = h.model(feats, cap.grid, size, concepts=side, extra=extra if m.dino else None)
            out[task] = predictions(task, pred).cpu()
        return out
