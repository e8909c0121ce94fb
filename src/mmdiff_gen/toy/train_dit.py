"""Phase 4 of the toy recipe: the FLUX transformer, trained with rectified flow on frozen text encoders.

The text encoders come pretrained and frozen from the text phase, as FLUX.1-dev's do. Text is
tokenized exactly as FluxPipeline does at inference (fixed-length padding, no attention mask), so
training and sampling see the same conditioning.

An auxiliary loss makes the transformer's own features carry shape: a linear probe on the image tokens
of a mid single-stream block predicts the clean render's class map (2×2 cells of 4 px per 8-px token)
from the noisy latent and the caption. Unlike weighting the flow loss by object pixels (whose
minimiser is no longer E[x₀ | xₜ]), an auxiliary target leaves the flow objective's minimiser alone; it
shapes the shared representation, as REPA-style alignment does for large DiTs. The probe is dropped at
export: the shipped transformer is plain FLUX.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..io.state import load_state, save_state
from ..train.trainer import ema_update
from ._loop import Phase
from .data import SceneArrays, class_fractions
from .recipe import ToyRecipe
from .train_text import encode_text, load_text, tokenize
from .train_vae import encode_mean
from .world import CLASSES


LATENTS_FILE = "latents.safetensors"


@torch.no_grad()
def cached_latents(vae, data: SceneArrays, work: Path) -> torch.Tensor:
    """(N, C, h, w) float16 posterior means of every scene, cached in work/latents.safetensors."""
    path = Path(work) / LATENTS_FILE
    key = {"n": len(data), "shift": vae.config.shift_factor, "scale": vae.config.scaling_factor}
    if path.is_file():
        try:
            saved = load_state(path)
        except ValueError:
            saved = None  # a damaged or foreign file is only a cache miss: recompute and overwrite it
        if isinstance(saved, dict) and saved.get("key") == key and isinstance(saved.get("latents"), torch.Tensor):
            return saved["latents"]
    lat = torch.cat([encode_mean(vae, data.images[i : i + 256]).half() for i in range(0, len(data), 256)])
    save_state(path, {"key": key, "latents": lat})
    return lat


def class_map_tokens(pipe, seg: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, 64, 64) class ids → (B, tokens, classes, 4): class fractions of each token's 2×2 latent cells."""
    b, n = seg.shape[0], len(CLASSES)
    return pipe._pack_latents(class_fractions(seg, h, w), b, n, h, w).reshape(b, (h // 2) * (w // 2), n, 4)


def class_map_loss(probe: nn.Module, tokens: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the probe's class logits on each token's 2×2 cells against the clean labels' class fractions:
    tokens (B, N, C) → logits shaped as `target` (B, N, classes, 4)."""
    logits = probe(tokens).view(target.shape)
    return F.cross_entropy(logits.transpose(1, 2), target.transpose(1, 2))


def train_dit(pipe, data: SceneArrays, recipe: ToyRecipe, work: Path, steps: int | None = None,
              compile: bool = False) -> None:
    """Train the transformer in place from work/dit.state.safetensors; leaves the EMA weights in the pipeline.

    `compile` runs the transformer through torch.compile (on this CPU, 0.57 s instead of 0.81 s per
    step of the 128-wide transformer, after a ≈3-minute compile); the module and its checkpoints stay
    the plain ones.
    """
    steps = recipe.dit_steps if steps is None else steps
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    load_text(pipe, work)
    vae, tr = pipe.vae, pipe.transformer
    lat = cached_latents(vae, data, work)
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    with torch.no_grad():  # frozen encoders: every caption's conditioning once, (N, D) and (N, L, D)
        clip_ids, t5_ids = tokenize(pipe, data.captions + [""], recipe.t5_max_length)
        pooled_all, text_all = map(torch.cat, zip(*(encode_text(pipe, clip_ids[i : i + 512], t5_ids[i : i + 512])
                                                    for i in range(0, len(clip_ids), 512))))
    empty = len(data)  # index of the empty caption (caption dropout)

    # The class-map probe reads the image tokens of the middle single-stream block.
    blocks = tr.single_transformer_blocks
    probe = nn.Linear(tr.inner_dim, len(CLASSES) * 4)
    seen: dict[str, torch.Tensor] = {}
    hook = blocks[len(blocks) // 2 - 1].register_forward_hook(lambda m, i, o: seen.__setitem__("img", o[1]))

    models = torch.nn.ModuleDict({"transformer": tr, "clip": pipe.text_encoder, "t5": pipe.text_encoder_2})
    ema = copy.deepcopy(models).eval().requires_grad_(False)
    opt = torch.optim.AdamW(list(tr.parameters()) + list(probe.parameters()), lr=recipe.dit_lr, weight_decay=0.0)
    phase = Phase(work, "dit", {"models": models, "ema": ema, "probe": probe, "opt": opt}, steps, lr=recipe.dit_lr,
                  warmup=recipe.dit_warmup)
    gen = torch.Generator().manual_seed(recipe.seed + 2 + phase.start)
    h, w = lat.shape[-2:]
    img_ids = pipe._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", torch.float32)
    txt_ids = torch.zeros(recipe.t5_max_length, 3)
    forward = torch.compile(tr) if compile else tr
    tr.train().requires_grad_(True)
    for step in phase:
        b = recipe.dit_batch
        idx = torch.randint(0, len(data), (b,), generator=gen)
        x0 = (lat[idx].float() - shift) * scale
        x0 = pipe._pack_latents(x0, b, x0.shape[1], h, w)  # (B, h/2·w/2, 4C)
        drop = torch.rand(b, generator=gen) < recipe.caption_dropout
        cap = torch.where(drop, empty, idx)
        t = torch.sigmoid(torch.randn(b, generator=gen) + recipe.t_logit_mean)  # logit-normal sigma
        noise = torch.randn(x0.shape, generator=gen)
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        pred = forward(hidden_states=xt, timestep=t, pooled_projections=pooled_all[cap],
                       encoder_hidden_states=text_all[cap], txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        flow = F.mse_loss(pred, noise - x0)
        target = class_map_tokens(pipe, torch.from_numpy(data.seg[idx.numpy()]), h, w)  # (B, tokens, classes, 4)
        seg = class_map_loss(probe, seen.pop("img"), target)
        phase.step(flow + recipe.dit_seg_weight * seg, clip=tr.parameters(), shown=flow)
        ema_update(ema, models, recipe.ema if step > recipe.dit_warmup else 0.0)
    hook.remove()
    models.load_state_dict(ema.state_dict())
    models.eval().requires_grad_(False)
