"""Run the prompt-fidelity protocol: fresh captions → toy backbone → oracle → judge; plus the judge's ceilings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from ..backbones import load_backbone
from ..capture import CaptureSpec, generate
from ..io.preview import caption_grid
from .fidelity import CAPTION_SEED, fidelity, found_per_class
from .oracle import Oracle, reconstruct_images
from .train_vae import reconstruction_psnr
from .world import caption_of, render_scene

GEN_SEED = 8_000_000  # sampling noise seeds for fidelity runs


def fresh_scenes(n: int, objects: int):
    """n scenes with `objects` objects each, from seeds no training scene uses."""
    return [render_scene(CAPTION_SEED + 1000 * objects + i, n_objects=objects) for i in range(n)]


@torch.no_grad()
def run_fidelity(model: str, n: int, counts: list[int], batch_size: int, sheet: Path | None,
                 lora: Path | None = None, lora_scale: float = 1.0) -> dict:
    """Fidelity of generated images per object count, with the judge's ceilings (renders, VAE reconstructions);
    `lora` is loaded into the backbone."""
    bb = load_backbone(model, dtype=torch.float32, device="cpu", lora=lora, lora_scale=lora_scale)
    oracle = Oracle.from_checkpoint()
    s = bb.sampling
    result: dict = {"model": model, "sampling": s, "n": n}
    shown = []
    for k in counts:
        scenes = fresh_scenes(n, k)
        layouts = [sc.things for sc in scenes]
        captions = [caption_of(t) for t in layouts]
        images = []
        for i in range(0, n, batch_size):
            gen = generate(bb, captions[i : i + batch_size], CaptureSpec(sigmas=(0.5,)),
                           seeds=[GEN_SEED + 1000 * k + j for j in range(i, min(n, i + batch_size))],
                           output_type="np", **bb.sampling_kwargs())
            images.append((gen.images * 255).round().astype(np.uint8))
        images = np.concatenate(images)
        renders = np.stack([sc.image for sc in scenes])
        recs = reconstruct_images(bb.pipe.vae, renders)
        segs = oracle.predict(images)["seg"]
        result[f"{k}_object"] = {
            "generated": fidelity(images, segs, layouts),
            "found_per_class": found_per_class(images, segs, layouts),
            "ceiling_renders": fidelity(renders, oracle.predict(renders)["seg"], layouts),
            "ceiling_vae": fidelity(recs, oracle.predict(recs)["seg"], layouts),
            "vae_psnr_db": reconstruction_psnr(bb.pipe.vae, renders),
        }
        shown += list(zip(images[:16], captions[:16]))
    if sheet is not None:
        caption_grid(shown, sheet)
    return result
