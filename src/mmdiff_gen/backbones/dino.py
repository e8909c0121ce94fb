"""Optional DINOv3 features (MMDiff §3.3): a frozen ViT's patch features laid on the DiT's token grid.

The paper concatenates DINOv3 ViT-B/16 features with the fused DiT features and concept maps before
the decoder. Here the image is resized so that the ViT's patch grid *is* the DiT token grid
(FLUX.1-dev at 512²: 32×32 tokens of 16 px = DINOv3's 16-px patches at 512²), so no feature map is
interpolated. Chosen layers are normalised by the ViT's final LayerNorm (as DINO's own multi-layer
read-out does) and stacked along channels.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .loading import config_digest

# ImageNet statistics, which DINOv3's web-image (LVD) models are trained with; a model folder's
# preprocessor_config.json overrides them (the satellite models use others).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class DinoFeatures:
    """A frozen DINOv3 ViT (transformers' DINOv3ViTModel) as an extra feature source for heads.

    Args:
        model: the ViT.
        name: how the user named it (a local folder); recorded in caches and heads.
        layers: 0-based transformer layers to read; default: one early and the last ((2, 11) for
            ViT-B/16's 12 layers, the layers the paper's Fig. 6 shows; the same depths elsewhere).
        weights_id: a fingerprint of the weights ("" for models built in memory).
    """

    def __init__(self, model, name: str = "dinov3", layers: Sequence[int] | None = None, weights_id: str = "",
                 mean: Sequence[float] = MEAN, std: Sequence[float] = STD):
        self.model = model.eval().requires_grad_(False)
        self.mean, self.std = tuple(mean), tuple(std)
        n = model.config.num_hidden_layers
        self.layers = tuple(sorted(set(layers if layers is not None else (round(2 * (n - 1) / 11), n - 1))))
        if min(self.layers) < 0 or max(self.layers) >= n:
            raise ValueError(f"DINOv3 layers {self.layers} out of range: the model has {n} layers")
        self.name = name
        self.weights_id = weights_id
        self.patch = int(model.config.patch_size)

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             layers: Sequence[int] | None = None) -> "DinoFeatures":
        """From a local folder (e.g. `hf download facebook/dinov3-vitb16-pretrain-lvd1689m --local-dir …`)."""
        from transformers import DINOv3ViTModel

        from .loading import safetensors_only

        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no DINOv3 model at {folder} (expected a folder with config.json and weights)")
        safetensors_only(folder, "DINOv3")
        model = DINOv3ViTModel.from_pretrained(folder, use_safetensors=True, dtype=dtype,  # never a pickled .bin
                                               local_files_only=True).to(device)
        h = hashlib.sha256()
        for f in sorted(folder.glob("*.safetensors")):
            with open(f, "rb") as fh:  # size + the first MiB: cheap, and tells same-shape checkpoints apart
                h.update(f"{f.name}:{f.stat().st_size};".encode() + fh.read(1 << 20))
        prep = folder / "preprocessor_config.json"
        stats = json.loads(prep.read_text()) if prep.is_file() else {}
        return cls(model, name=str(path), layers=layers, weights_id=h.hexdigest()[:16],
                   mean=stats.get("image_mean", MEAN), std=stats.get("image_std", STD))

    @property
    def channels(self) -> int:
        """E, the channels of the maps: hidden size × layers (ViT-B: 768 × 2)."""
        return int(self.model.config.hidden_size) * len(self.layers)

    def identity(self) -> dict:
        """What a head trained on these features records and later checks."""
        return {"name": self.name, "config_sha256": config_digest(self.model.config, mean=self.mean, std=self.std),
                "layers": list(self.layers), "weights": self.weights_id}

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, E, h, w) float32 maps from images (B, 3, H, W) in [0, 1], on the (h, w) token grid."""
        p = next(self.model.parameters())
        h, w = grid
        x = F.interpolate(images.to(device=p.device, dtype=torch.float32), size=(h * self.patch, w * self.patch),
                          mode="bilinear", antialias=True, align_corners=False)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        out = self.model(((x - mean) / std).to(p.dtype), output_hidden_states=True)
        maps = []
        for i in self.layers:
            tokens = self.model.norm(out.hidden_states[i + 1])[:, -h * w :]  # (B, h·w, D): patches after CLS/registers
            maps.append(tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w))
        return torch.cat(maps, 1).float()

    def check(self, recorded: dict, what: str) -> None:
        """Raise ValueError unless `recorded` (a head's or cache's DINOv3 identity) is these features."""
        mine = self.identity()
        if recorded.get("config_sha256") != mine["config_sha256"] or list(recorded.get("layers", [])) != mine["layers"]:
            raise ValueError(f"{what} was made with DINOv3 {recorded.get('name')!r} layers {recorded.get('layers')}; "
                             f"the loaded one is {mine['name']!r} layers {mine['layers']}")
        if recorded.get("weights") and mine["weights"] and recorded["weights"] != mine["weights"]:
            raise ValueError(f"{what} was made with other DINOv3 weights than {mine['name']!r}")


def images_tensor(images) -> torch.Tensor:
    """PIL images or (H, W, 3) uint8 arrays → (B, 3, H, W) float in [0, 1]."""
    import numpy as np

    arr = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255
