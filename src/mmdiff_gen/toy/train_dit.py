"""Phase 2 of the toy recipe: the FLUX transformer and both text encoders, trained jointly (rectified flow).

The text encoders are trained with the transformer (at half its learning rate) so that word order
binds colours to objects — frozen random encoders ignore order (notes/toy-backbone.md) — then frozen
and shipped. Text is tokenized exactly as FluxPipeline does at inference (fixed-length padding, no
attention mask), so training and sampling see the same conditioning.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from ._loop import Checkpoint, Progress, ema_update, warmup_cosine
from .data import SceneArrays
from .recipe import ToyRecipe
from .train_vae import encode_mean


@torch.no_grad()
def cached_latents(vae, data: SceneArrays, path: Path) -> torch.Tensor:
    """(N, C, h, w) float16 posterior means of every scene, cached beside the VAE checkpoint."""
    key = {"n": len(data), "shift": vae.config.shift_factor, "scale": vae.config.scaling_factor}
    if path.is_file():
        saved = torch.load(path, weights_only=False)
        if saved["key"] == key:
            return saved["latents"]
    lat = torch.cat([encode_mean(vae, data.images[i : i + 256]).half() for i in range(0, len(data), 256)])
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"key": key, "latents": lat}, tmp)
    tmp.replace(path)
    return lat


def tokenize(pipe, captions: list[str], t5_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP ids (N, 77) and T5 ids (N, t5_length), padded as FluxPipeline pads them."""
    clip = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids
    t5 = pipe.tokenizer_2(captions, padding="max_length", max_length=t5_length, truncation=True,
                          return_tensors="pt").input_ids
    return clip, t5


def train_dit(pipe, data: SceneArrays, recipe: ToyRecipe, work: Path, steps: int | None = None,
              compile: bool = False) -> None:
    """Train transformer + text encoders in place from work/dit.ckpt; leaves the EMA weights in the pipeline.

    `compile` runs the transformer through torch.compile (on this CPU, 0.57 s instead of 0.81 s per
    step of the 128-wide transformer, after a ≈3-minute compile); the module and its checkpoints stay
    the plain ones.
    """
    steps = recipe.dit_steps if steps is None else steps
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    vae, tr = pipe.vae, pipe.transformer
    lat = cached_latents(vae, data, work / "latents.pt")
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    clip_ids, t5_ids = tokenize(pipe, data.captions, recipe.t5_max_length)
    empty_clip, empty_t5 = tokenize(pipe, [""], recipe.t5_max_length)

    models = torch.nn.ModuleDict({"transformer": tr, "clip": pipe.text_encoder, "t5": pipe.text_encoder_2})
    ema = copy.deepcopy(models).eval().requires_grad_(False)
    opt = torch.optim.AdamW([
        {"params": tr.parameters(), "lr_scale": 1.0},
        {"params": list(pipe.text_encoder.parameters()) + list(pipe.text_encoder_2.parameters()),
         "lr_scale": recipe.text_lr_scale},
    ], lr=recipe.dit_lr, weight_decay=0.0)
    ckpt = Checkpoint(work / "dit.ckpt")
    parts = {"models": models, "ema": ema, "opt": opt}
    start = ckpt.resume(parts)
    gen = torch.Generator().manual_seed(recipe.seed + 2 + start)
    h, w = lat.shape[-2:]
    img_ids = pipe._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", torch.float32)
    txt_ids = torch.zeros(recipe.t5_max_length, 3)
    forward = torch.compile(tr) if compile else tr
    models.train().requires_grad_(True)
    prog = Progress("dit", steps, start)
    for step in range(start, steps):
        for g in opt.param_groups:
            g["lr"] = recipe.dit_lr * g["lr_scale"] * warmup_cosine(step, steps, recipe.dit_warmup)
        b = recipe.dit_batch
        idx = torch.randint(0, len(data), (b,), generator=gen)
        x0 = (lat[idx].float() - shift) * scale
        x0 = pipe._pack_latents(x0, b, x0.shape[1], h, w)  # (B, h/2·w/2, 4C)
        drop = torch.rand(b, generator=gen) < recipe.caption_dropout
        c_ids = torch.where(drop[:, None], empty_clip, clip_ids[idx])
        t_ids = torch.where(drop[:, None], empty_t5, t5_ids[idx])
        pooled = pipe.text_encoder(c_ids, output_hidden_states=False).pooler_output
        text = pipe.text_encoder_2(t_ids, output_hidden_states=False)[0]
        t = torch.sigmoid(torch.randn(b, generator=gen) + recipe.t_logit_mean)  # logit-normal sigma
        noise = torch.randn(x0.shape, generator=gen)
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        pred = forward(hidden_states=xt, timestep=t, pooled_projections=pooled, encoder_hidden_states=text,
                       txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(models.parameters(), 1.0)
        opt.step()
        ema_update(ema, models, recipe.ema if step > recipe.dit_warmup else 0.0)
        prog.update(step, loss.item())
        ckpt.maybe_save(step, steps, parts)
    models.load_state_dict(ema.state_dict())
    models.eval().requires_grad_(False)
