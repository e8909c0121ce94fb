"""A frozen pixel model whose labels of generated images teach heads (`distill`): any transformers
semantic-segmentation or depth-estimation model (SegFormer, Mask2Former, EoMT, UPerNet, DPT, Depth Anything V2…).

A teacher maps uint8 images (B, H, W, 3) to labels by task, at the images' size and in the task's label dtype
(`tasks.py`): seg uint8 class ids (its own label set: `id2label`), depth float32. Depth Anything's "relative"
models (and DPT's) predict relative inverse depth; it is turned into depth (1 / disparity, normalised to a median
of 1) so the heads' scale-invariant log loss can learn it — the head then predicts relative depth, which its file
records (`depth_unit`). Metric models (Depth Anything V2 Metric, ZoeDepth, GLPN, Depth Pro) give metres.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .loading import BackboneNotFound, _weights_id, config_digest, hub_snapshot, safetensors_only

# Depth models whose output is relative inverse depth (disparity), by transformers model type; Depth Anything
# says so itself (config.depth_estimation_type).
_DISPARITY_TYPES = {"dpt"}


class Teacher:
    """Labels for one task from a transformers model (use `Teacher.load`).

    Args:
        model: an AutoModelForSemanticSegmentation or AutoModelForDepthEstimation model.
        processor: its image processor (resizing, normalisation, post-processing).
        task: "seg" or "depth".
        name: how the user named it (recorded in the heads).
        weights_id: a fingerprint of its weights ("" for a model built in memory).
    """

    def __init__(self, model, processor, task: str, name: str, weights_id: str = ""):
        if task not in ("seg", "depth"):
            raise ValueError(f"a transformers teacher labels seg or depth, not {task!r}")
        self.model, self.processor = model.eval().requires_grad_(False), processor
        self.name, self.weights_id = name, weights_id
        self.tasks = (task,)
        cfg = model.config
        labels = getattr(cfg, "id2label", None) or {}
        self.classes = [str(labels[i]) for i in sorted(labels, key=int)] if task == "seg" else []
        if task == "seg" and len(self.classes) > 255:
            raise ValueError(f"{name} has {len(self.classes)} classes; class-id labels hold 255 at most (255 = ignore)")
        kind = getattr(cfg, "depth_estimation_type", None)
        self.disparity = task == "depth" and (kind == "relative"
                                             or (kind is None and cfg.model_type in _DISPARITY_TYPES))
        self.depth_unit = ("relative" if self.disparity else "metre") if task == "depth" else ""

    @classmethod
    def load(cls, name: str, task: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
             ) -> "Teacher":
        """From a local folder or a Hub id in the local HF cache (downloaded when the Hub is reachable); safetensors
        only."""
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation, AutoModelForSemanticSegmentation

        folder = Path(name).expanduser()
        if not folder.is_dir():
            folder = hub_snapshot(name, allow_patterns=["*.json", "*.safetensors", "*.txt"], download=True)
            if folder is None:
                raise BackboneNotFound(f"teacher {name!r} is neither a folder nor in the local Hugging Face cache; "
                                       f"on a machine with internet run `hf download {name}`")
        safetensors_only(folder, f"teacher {name}")
        if not any(folder.glob("*.safetensors")):
            raise BackboneNotFound(f"teacher {name!r} has no .safetensors weights")
        auto = AutoModelForSemanticSegmentation if task == "seg" else AutoModelForDepthEstimation
        try:
            model = auto.from_pretrained(folder, dtype=dtype, use_safetensors=True, local_files_only=True)
        except ValueError as e:  # transformers: "Unrecognized configuration class … for this kind of AutoModel"
            raise ValueError(f"{name} is not a {'semantic-segmentation' if task == 'seg' else 'depth-estimation'} "
                             f"model ({str(e).splitlines()[0][:120]})") from None
        processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        return cls(model.to(device), processor, task, name=str(name),
                   weights_id=_weights_id(folder, files="*.safetensors"))

    def identity(self) -> dict:
        """What a distilled head records of its teacher."""
        return {"name": self.name, "task": self.tasks[0], "weights": self.weights_id, "depth_unit": self.depth_unit,
                "config_sha256": config_digest(self.model.config)}

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """{task: labels (B, H, W)} of uint8 images (B, H, W, 3)."""
        p = next(self.model.parameters())
        inputs = self.processor(images=list(images), return_tensors="pt")
        inputs = {k: v.to(p.device, p.dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}
        out = self.model(**inputs)
        sizes = [images.shape[1:3]] * len(images)
        if self.tasks[0] == "seg":
            maps = self.processor.post_process_semantic_segmentation(out, target_sizes=sizes)
            return {"seg": torch.stack(maps).to(torch.uint8).cpu().numpy()}
        maps = self.processor.post_process_depth_estimation(out, target_sizes=sizes)
        depth = torch.stack([m["predicted_depth"] for m in maps]).float()  # (B, H, W)
        if self.disparity:  # relative inverse depth → depth up to scale; no depth where disparity ≤ 0
            valid = depth > 1e-6
            inv = torch.where(valid, 1 / depth.clamp(min=1e-6), torch.zeros_like(depth))
            med = torch.stack([v[m].median() if m.any() else v.new_tensor(1.0) for v, m in zip(inv, valid)])
            depth = inv / med.view(-1, 1, 1)
        return {"depth": depth.clamp(min=0).cpu().numpy()}

