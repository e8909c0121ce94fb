"""Phase 2 of the toy recipe: an independent pixel-space oracle for segmentation, saliency and depth.

It never sees diffusion features: it is the pseudo-ground-truth for generated images (the paper's
Table 1 protocol) and the "separate model on pixels" baseline. Half of each training batch is VAE
reconstructions, so that it reads generated (VAE-decoded) images as well as renders.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .._atomic import atomic_path
from ..train.metrics import DepthMetrics, SaliencyMetrics, SegMetrics
from ._loop import Phase, conv_autocast
from .data import SceneArrays, render_arrays
from .recipe import ASSET_DIR, ToyRecipe
from .train_vae import to_pixels
from .world import CLASSES, PALETTE

ORACLE_FILE = ASSET_DIR.parent / "toy_oracle.safetensors"
HELD_OUT_SEED = 5_000_000  # held-out renders: seeds far from every training range


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.GELU(),
        nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.GELU(),
    )


class Oracle(nn.Module):
    """A small U-Net from pixels to class logits, a saliency logit and depth.

    Args:
        num_classes: segmentation classes (background included).
        width: channels of the first stage (doubled at each of three downsamplings, capped at 4×).

    Input (B, 3, H, W) in [−1, 1], H and W multiples of 8. Output dict: seg (B, K, H, W) logits,
    saliency (B, 1, H, W) logits, depth (B, 1, H, W) metres (exp of a log-depth output).
    """

    def __init__(self, num_classes: int = len(CLASSES), width: int = 32):
        super().__init__()
        self.config = {"num_classes": num_classes, "width": width}
        w = [width, 2 * width, 4 * width, 4 * width]
        self.enc = nn.ModuleList([_block(3, w[0]), _block(w[0], w[1]), _block(w[1], w[2]), _block(w[2], w[3])])
        self.dec = nn.ModuleList([_block(w[3] + w[2], w[2]), _block(w[2] + w[1], w[1]), _block(w[1] + w[0], w[0])])
        self.head = nn.Conv2d(w[0], num_classes + 2, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        skips = []
        for i, blk in enumerate(self.enc):
            x = blk(x if i == 0 else F.avg_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for blk in self.dec:
            x = blk(torch.cat([F.interpolate(x, scale_factor=2, mode="nearest"), skips.pop()], 1))
        out = self.head(x)
        k = self.config["num_classes"]
        return {"seg": out[:, :k], "saliency": out[:, k : k + 1], "depth": out[:, k + 1 :].exp()}

    @torch.no_grad()
    def predict(self, images: np.ndarray, batch: int = 128) -> dict[str, np.ndarray]:
        """uint8 (N, H, W, 3) → seg (N, H, W) uint8, saliency (N, H, W) uint8 0–255, depth (N, H, W) metres."""
        self.eval()
        outs = {"seg": [], "saliency": [], "depth": []}
        for i in range(0, len(images), batch):
            o = self(to_pixels(images[i : i + batch]).to(next(self.parameters()).device))
            outs["seg"].append(o["seg"].argmax(1).byte().cpu())
            outs["saliency"].append((o["saliency"].sigmoid()[:, 0] * 255).round().byte().cpu())
            outs["depth"].append(o["depth"][:, 0].float().cpu())
        return {k: torch.cat(v).numpy() for k, v in outs.items()}

    def save(self, path: Path, metrics: dict) -> None:
        meta = {"config": json.dumps(self.config), "classes": json.dumps(list(CLASSES)),
                "palette": json.dumps([list(c) for c in PALETTE]), "metrics": json.dumps(metrics)}
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(tmp), metadata=meta)

    @classmethod
    def from_checkpoint(cls, path: Path = ORACLE_FILE) -> "Oracle":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        model = cls(**json.loads(meta["config"]))
        model.load_state_dict(load_file(str(path)))
        return model.eval()


class OracleTeacher:
    """The oracle as a `distill` teacher on the toy world: seg, saliency (its mask, as renders label it: 0 / 255)
    and depth in metres of generated images (the pseudo-ground-truth of the consistency protocol)."""

    tasks = ("seg", "saliency", "depth")
    classes = list(CLASSES)
    palette = [list(c) for c in PALETTE]
    depth_unit = "metre"

    def __init__(self, path: Path = ORACLE_FILE):
        self.path = Path(path)
        self.oracle = Oracle.from_checkpoint(self.path)

    def identity(self) -> dict:
        return {"name": "toy-oracle", "file": self.path.name, "tasks": list(self.tasks), "depth_unit": self.depth_unit}

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        out = self.oracle.predict(images)
        out["saliency"] = np.where(out["saliency"] >= 128, 255, 0).astype(np.uint8)
        return out

def pixel_losses(out: dict, targets: dict) -> torch.Tensor:
    """The pixel model's loss over the tasks `targets` holds (the oracle's recipe, also the downstream models'):
    cross-entropy on seg ids (B, H, W) (255 ignored), BCE on saliency (B, H, W) 0–255 read as [0, 1], L1 of
    log depth (B, H, W) metres. Equal weights: each term is O(1), none drowns the class term."""
    loss = out["seg"].new_zeros(())
    if "seg" in targets:
        loss = loss + F.cross_entropy(out["seg"].float(), targets["seg"].long(), ignore_index=255)
    if "saliency" in targets:
        loss = loss + F.binary_cross_entropy_with_logits(out["saliency"][:, 0].float(), targets["saliency"].float() / 255)
    if "depth" in targets:
        pred = out["depth"][:, 0].float().clamp(min=1e-3).log()
        loss = loss + (pred - targets["depth"].float().clamp(min=1e-3).log()).abs().mean()
    return loss


@torch.no_grad()
def _reconstruct(vae, x: torch.Tensor) -> torch.Tensor:
    with conv_autocast():
        return vae.decode(vae.encode(x).latent_dist.mean).sample.float().clamp(-1, 1)


def reconstruct_images(vae, images: np.ndarray, batch: int = 128) -> np.ndarray:
    """VAE reconstructions of uint8 (N, H, W, 3) images, as uint8: what a generated image can at best be."""
    rec = torch.cat([_reconstruct(vae, to_pixels(images[i : i + batch])) for i in range(0, len(images), batch)])
    return ((rec + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def train_oracle(vae, data: SceneArrays, recipe: ToyRecipe, work: Path, steps: int | None = None,
                 out: Path | None = None, eval_scenes: int = 500) -> dict:
    """Train the oracle (resuming from work/oracle.state.safetensors), evaluate on held-out renders, save it."""
    steps = recipe.oracle_steps if steps is None else steps
    model = Oracle()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.oracle_lr, weight_decay=1e-4)
    phase = Phase(work, "oracle", {"model": model, "opt": opt}, steps, lr=recipe.oracle_lr, warmup=100)
    gen = torch.Generator().manual_seed(recipe.seed + 3 + phase.start)
    model.train()
    for _ in phase:
        idx = torch.randint(0, len(data), (recipe.oracle_batch,), generator=gen).numpy()
        x = to_pixels(data.images[idx])
        half = len(idx) // 2
        x[:half] = _reconstruct(vae, x[:half])
        seg = torch.from_numpy(data.seg[idx]).long()
        depth = torch.from_numpy(data.depth[idx].astype(np.float32))
        with conv_autocast():
            pred = model(x)
        phase.step(pixel_losses(pred, {"seg": seg, "saliency": (seg > 0).to(torch.uint8) * 255, "depth": depth}))
    model.eval()
    held = render_arrays(HELD_OUT_SEED, eval_scenes)
    metrics = {"renders": evaluate_oracle(model, held.images, held)}
    metrics["vae_reconstructions"] = evaluate_oracle(model, reconstruct_images(vae, held.images), held)
    model.save(ORACLE_FILE if out is None else Path(out), metrics)
    print(json.dumps(metrics, indent=1))
    return metrics


def evaluate_oracle(model: Oracle, images: np.ndarray, truth: SceneArrays) -> dict:
    """mIoU, saliency and depth metrics of the oracle's predictions on `images` against exact labels."""
    pred = model.predict(images)
    seg, sal, dep = SegMetrics(len(CLASSES)), SaliencyMetrics(), DepthMetrics()
    for i in range(len(images)):
        seg.update(pred["seg"][i], truth.seg[i])
        sal.update(pred["saliency"][i], np.where(truth.seg[i] > 0, 255, 0).astype(np.uint8))
        dep.update(pred["depth"][i], truth.depth[i].astype(np.float32))
    return {"seg": seg.result(), "saliency": sal.result(), "depth": dep.result()}
