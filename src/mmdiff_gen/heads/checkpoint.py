"""One safetensors file per trained head: weights plus JSON metadata that rebuilds it and says what it expects."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .. import __version__
from .._atomic import atomic_path
from ..errors import SettingsError
from .model import HeadConfig, MMDiffHead

FORMAT_VERSION = 1


class HeadMismatch(SettingsError):
    """A head is being used with a backbone or capture setting it was not trained for."""


@dataclass
class HeadMeta:
    """Everything a head checkpoint records besides its weights.

    Attributes:
        config: the head's constructor arguments.
        backbone: identity of the backbone it was trained on (family, name, config_sha256).
        layers: capture layers, in the order of the features' L axis.
        blocks: the block list the layers index ("feature", or "joint": CaptureSpec.blocks).
        sigmas: capture sigmas, in the order of the T axis.
        concepts: concept words, in the order of the concept maps' K axis.
        classes: the class names of its classes task (files of one-channel heads from before multi-task heads
            hold [task]; nothing reads them).
        palette: RGB per class, for previews.
        metrics: the metrics the head reached, with the data they were measured on.
        depth_unit: unit of depth outputs ("metre"), else "".
        side: side maps the head reads: "concepts", "cross", "both" or "none".
        dino: identity of the DINOv3 features it reads as extra maps (name, config hash, layers,
            weights); empty for diffusion features only.
    """

    config: HeadConfig
    backbone: dict
    layers: list[int]
    sigmas: list[float]
    concepts: list[str]
    classes: list[str]
    palette: list[list[int]] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    depth_unit: str = ""
    side: str = "concepts"
    dino: dict = field(default_factory=dict)
    blocks: str = "feature"  # files written before joint-block features existed read feature blocks

    def check_inputs(self, spec, layers: list[int], source: str) -> None:
        """HeadMismatch naming what a capture (`spec`: a CaptureSpec, e.g. a feature cache's, whose resolved `layers`
        are these) lacks of this head's inputs: exactly its layers and blocks, exactly its concepts, the
        cross-attention if its side reads it."""
        from .inputs import reads_concepts, reads_cross

        redo = "; extract one for this head (eval --data DATA --cache NEW captures exactly what it reads)"
        if list(layers) != list(self.layers) or spec.blocks != self.blocks:
            raise HeadMismatch(f"{source} holds the {spec.blocks} blocks {list(layers)}; this head reads the "
                               f"{self.blocks} blocks {list(self.layers)}" + redo)
        if reads_concepts(self.side) and list(spec.concepts) != list(self.concepts):
            missing = [c for c in self.concepts if c not in spec.concepts]
            raise HeadMismatch(f"{source} holds the concepts {list(spec.concepts)}; this head reads "
                               f"{list(self.concepts)}" + (f" (missing: {', '.join(missing)})" if missing else "")
                               + redo)
        if reads_cross(self.side) and not spec.cross_attention:
            raise HeadMismatch(f"{source} has no cross-attention maps; this head reads them" + redo)

    def timestep_indices(self, captured: list[float]) -> tuple[int, ...]:
        """Indices of this head's sigmas among a capture's sigmas; HeadMismatch if one is missing."""
        missing = [s for s in self.sigmas if not any(abs(s - c) < 1e-6 for c in captured)]
        if missing:
            raise HeadMismatch(f"this head needs features at sigma {missing}; the capture has {captured}")
        return tuple(next(i for i, c in enumerate(captured) if abs(s - c) < 1e-6) for s in self.sigmas)

    def check_backbone(self, identity: dict) -> None:
        """Raise HeadMismatch unless `identity` is the backbone this head was trained on."""
        mine, theirs = self.backbone.get("config_sha256"), identity.get("config_sha256")
        w_mine, w_theirs = self.backbone.get("weights", ""), identity.get("weights", "")
        retrained = bool(w_mine and w_theirs and w_mine != w_theirs)
        if mine != theirs or self.backbone.get("family") != identity.get("family") or retrained:
            raise HeadMismatch(
                f"this {self.config.name} head was trained on {self.backbone.get('name')!r} "
                f"({self.backbone.get('family')}, config {mine}); the loaded backbone is {identity.get('name')!r} "
                f"({identity.get('family')}, config {theirs})" + (" with other weights" if retrained else "")
            )
        lora_mine, lora_theirs = self.backbone.get("lora", []), identity.get("lora", [])
        if lora_mine != lora_theirs:  # a LoRA changes the features the head reads
            def says(lora):
                return ", ".join(f"{a['name']!r}" + (" (fused)" if a.get("fused") else f" at scale {a.get('scale')}")
                                 for a in lora) or "no LoRA"
            raise HeadMismatch(f"this {self.config.name} head was trained with {says(lora_mine)}; the loaded backbone "
                               f"carries {says(lora_theirs)}: train the head on this backbone's features, or load the "
                               "backbone as the head was trained")


def save_head(path: Path, model: MMDiffHead, meta: HeadMeta) -> None:
    """Write weights and metadata to one safetensors file (written then renamed)."""
    header = {
        "format_version": str(FORMAT_VERSION),
        "code_version": __version__,
        "config": json.dumps(model.config.to_dict()),
        "meta": json.dumps({k: v for k, v in meta.__dict__.items() if k != "config"}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp), metadata=header)


def read_meta(path: Path) -> HeadMeta:
    try:
        with safe_open(str(path), "pt") as f:
            header = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error type for a file that is not safetensors
        if isinstance(e, FileNotFoundError):
            raise
        raise HeadMismatch(f"{path} is not a safetensors head file ({type(e).__name__})") from None
    if "config" not in header:
        raise HeadMismatch(f"{path} is not an mmdiff-gen head checkpoint")
    if int(header.get("format_version", 0)) > FORMAT_VERSION:
        raise HeadMismatch(f"{path} was written by a newer mmdiff-gen ({header.get('code_version')})")
    config = json.loads(header["config"])
    config["aspp_rates"] = tuple(config["aspp_rates"])
    if "task" in config:  # written before multi-task heads: one task, its decoder stored as "decoder."
        config["tasks"] = (config.pop("task"),)
    return HeadMeta(config=HeadConfig(**config), **json.loads(header["meta"]))


def head_paths(folder: Path) -> list[Path]:
    """The head files of a folder, by name (hidden .NAME.state.safetensors files are training states)."""
    return sorted(Path(folder).glob("[!.]*.safetensors"))


def load_head(path: Path, backbone: dict | None = None, device: str | torch.device = "cpu") -> tuple[MMDiffHead, HeadMeta]:
    """Rebuild a head from its file; with `backbone` (an identity dict), refuse a mismatched one."""
    meta = read_meta(path)
    if backbone is not None:
        meta.check_backbone(backbone)
    model = MMDiffHead(meta.config)
    model.load_state_dict(upgrade_keys(load_file(str(path), device=str(device)), meta.config.tasks[0]))
    return model.to(device).eval(), meta


def upgrade_keys(weights: dict, task: str) -> dict:
    """Head weights (file or resume state) from before multi-task heads name their one decoder "decoder.";
    today's name it "decoders.TASK."."""
    return {(f"decoders.{task}." + k[8:] if k.startswith("decoder.") else k): v for k, v in weights.items()}
