"""Seg4Diff's mask-alignment fine-tuning: a LoRA that sharpens the grounding expert block's image→text attention.

Recipe (Seg4Diff's public code): LoRA rank 16 / alpha 16 on the attention projections (`to_q`, `to_k`, `to_v`,
`to_out.0`) of the joint blocks (and of the expert block when it is a later, single-stream one). Each step noises
real images to logit-normal(0, 0.5) sigmas, runs the transformer once and adds

    1.0 × flow matching   MSE(v̂, ε − x0): the ordinary objective, so generation is preserved;
    0.1 × sigmoid focal   and   0.2 × dice   on the expert block's pre-softmax image→text attention logits of each
                          named class (mean over heads and over the class's sub-word tokens: (B, N) per class)
                          against that class's mask on the token grid (the fraction of each token's pixels).

The captions are the images' class names (or given ones); classes the caption does not name get no attention
loss. AdamW on the LoRA weights only, warm-up then cosine, gradients clipped. The result is a standard diffusers
LoRA file (`pipe.load_lora_weights` reads it; `generate --lora` loads it), written with the pipeline's own
`save_lora_weights`; training state (LoRA weights, optimiser, step) is checkpointed for resume.
"""

from __future__ import annotations

import inspect
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .._atomic import atomic_path
from ..backbones.base import Backbone
from ..backbones.loading import LORA_WEIGHTS
from ..capture._noise import noise_to
from ..capture.text_attention import image_text_qk, text_logits
from ..io.readers import Sample
from ..io.state import load_state, save_state
from .lr_schedule import warmup_cosine

ADAPTER = "grounding"
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class GroundingConfig:
    """How to fine-tune (defaults: Seg4Diff's recipe; steps and warm-up sized for a GPU run).

    Args:
        steps: optimiser steps (the authors: 1–3 k).
        batch_size: images per step.
        lr: AdamW rate of the LoRA weights (1e-5).
        weight_decay: AdamW weight decay (1e-4).
        warmup: linear warm-up steps, then cosine to 0 (500).
        rank, alpha: LoRA rank and alpha (16, 16).
        focal_weight, dice_weight, flow_weight: loss weights (0.1, 0.2, 1.0).
        timestep_std: std of the logit-normal sigma distribution (mean 0; 0.5).
        layer: the expert block (index into the backbone's attention blocks); None: the backbone's grounding layer.
        clip: gradient-norm clip.
        checkpoint_every: steps between training-state checkpoints.
        gradient_checkpointing: recompute each block's activations in backward (diffusers'
            `enable_gradient_checkpointing`): FLUX.1-dev at 1024² needs it to fit one 80 GB GPU.
        seed: LoRA initialisation, sampling of images, sigmas and noise.
    """

    steps: int = 1000
    batch_size: int = 4
    lr: float = 1e-5
    weight_decay: float = 1e-4
    warmup: int = 500
    rank: int = 16
    alpha: int = 16
    focal_weight: float = 0.1
    dice_weight: float = 0.2
    flow_weight: float = 1.0
    timestep_std: float = 0.5
    layer: int | None = None
    clip: float = 1.0
    checkpoint_every: int = 50
    gradient_checkpointing: bool = False
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "rank", "alpha", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if not (self.lr > 0 and self.timestep_std > 0) or min(self.focal_weight, self.dice_weight, self.flow_weight,
                                                             self.warmup) < 0:
            raise ValueError("lr and timestep_std must be > 0, warmup and the loss weights ≥ 0")


def sigmoid_focal(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Mean sigmoid focal loss (Lin et al. 2017) of logits against soft targets in [0, 1], any shape."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    a_t = alpha * target + (1 - alpha) * (1 - target)
    return (a_t * (1 - p_t) ** gamma * ce).mean()


def dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over rows of 1 − soft Dice between sigmoid(logits) and targets; (R, N) each."""
    p = logits.sigmoid()
    return (1 - (2 * (p * target).sum(-1) + 1) / (p.sum(-1) + target.sum(-1) + 1)).mean()


def token_masks(seg: np.ndarray, classes: Sequence[int], grid: tuple[int, int]) -> torch.Tensor:
    """(K, h·w) float: the fraction of each token's pixels that belong to each class of `classes`; seg (H, W) ids."""
    h, w = grid
    t = torch.from_numpy(seg.astype(np.int64))
    masks = torch.stack([(t == c).float() for c in classes])[:, None]  # (K, 1, H, W)
    return F.adaptive_avg_pool2d(masks, (h, w)).flatten(1)


def caption_of(sample: Sample, names: Sequence[str]) -> str:
    """The sample's caption, else its present classes' names (not the background): the recipe's COCO captions."""
    if sample.caption:
        return sample.caption
    ids = [int(c) for c in np.unique(sample.labels["seg"]) if 0 < c < len(names)]
    return ", ".join(names[c] for c in ids)


def lora_targets(backbone: Backbone, layer: int) -> list[str]:
    """Module names of the adapted projections: the joint blocks' and the expert block's `TARGETS`."""
    names = {id(m): n for n, m in backbone.transformer.named_modules()}
    blocks = list(backbone.joint_blocks)
    expert = backbone.attention_blocks[layer]
    if all(expert is not b for b in blocks):
        blocks.append(expert)
    out = []
    for blk in blocks:
        present = dict(blk.attn.named_modules())  # FLUX's single-stream blocks have no to_out
        out += [f"{names[id(blk)]}.attn.{t}" for t in TARGETS if t in present]
    return out


class ExpertTap:
    """The expert block's projection outputs of one transformer call, kept with their gradients.

    Only references are kept, and the first of each per call, so it works under gradient checkpointing (the
    recomputation in backward stores nothing the forward did not); logits are computed after the call.
    Install it after the LoRA: peft wraps the projections in new modules."""

    def __init__(self, block: torch.nn.Module, rotate):
        self.block, self.rotate, self.kept = block, rotate, {}
        attn = block.attn
        self.handles = [block.register_forward_pre_hook(self._pre, with_kwargs=True)]
        self.handles += [getattr(attn, n).register_forward_hook(self._keep(n)) for n in ("to_q", "to_k", "add_k_proj")
                         if getattr(attn, n, None) is not None]

    def _pre(self, module, args, kwargs):
        if "rotary" not in self.kept:  # gradient checkpointing passes the block's arguments by position
            bound = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
            enc = bound.get("encoder_hidden_states")
            self.kept.update(rotary=bound.get("image_rotary_emb"), text_len=None if enc is None else enc.shape[1])

    def _keep(self, name: str):
        def hook(_module, _inputs, output):
            self.kept.setdefault(name, output)
        return hook

    def start(self) -> None:
        self.kept = {}

    def logits(self) -> torch.Tensor:
        """(B, N, S) pre-softmax image→text logits of the last call, mean over heads."""
        q, tk, _ = image_text_qk(self.block.attn, self.kept, self.rotate)
        return text_logits(q, tk)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class GroundingLoss:
    """One forward of the transformer with LoRA on a batch of real images, and the recipe's loss terms."""

    def __init__(self, backbone: Backbone, cfg: GroundingConfig, classes: Sequence[str]):
        self.bb, self.cfg, self.classes = backbone, cfg, list(classes)
        self.layer = backbone.default_grounding()["layer"] if cfg.layer is None else cfg.layer
        if not 0 <= self.layer < len(backbone.attention_blocks):
            raise ValueError(f"grounding layer {self.layer} out of range: the backbone has "
                             f"{len(backbone.attention_blocks)} attention blocks")
        self.tap: ExpertTap | None = None

    def __call__(self, samples: Sequence[Sample], sigma: torch.Tensor, noise_seed: int) -> dict[str, torch.Tensor]:
        """{"flow", "focal", "dice", "loss"} of `samples` noised to `sigma` (B,)."""
        bb, cfg = self.bb, self.cfg
        pixels = bb.pipe.image_processor.preprocess([s.image for s in samples]).to(bb.device)  # (B, 3, H, W)
        b, _, height, width = pixels.shape
        grid = bb.token_grid(height, width)
        with torch.no_grad():
            x0 = bb.encode_images(pixels)  # (B, N, C) packed (FLUX) or (B, C, h, w) (SD3)
        gen = torch.Generator(device="cpu").manual_seed(noise_seed)
        noise = torch.randn(x0.shape, generator=gen, dtype=torch.float32).to(x0.device, x0.dtype)
        sigma = sigma.to(x0.device)
        latents = noise_to(x0, noise, sigma)
        captions = [caption_of(s, self.classes) for s in samples]
        s = bb.sampling_kwargs()
        with torch.no_grad():
            cond = bb.encode_prompts(captions, s["max_sequence_length"])
        inputs = bb.transformer_inputs(latents, sigma, cond, s["guidance_scale"], height, width)
        if self.tap is None:  # at the first call: after the LoRA wrapped the projections
            self.tap = ExpertTap(bb.attention_blocks[self.layer], bb.rotate)
        self.tap.start()
        pred = bb.transformer(**inputs)[0]
        logits = self.tap.logits()  # (B, N, S) pre-softmax, mean over heads
        flow = F.mse_loss(pred.float(), (noise - x0).float())
        rows, targets = [], []
        for i, pos in enumerate(bb.class_token_positions(captions, self.classes)):
            named = sorted(c for c, tokens in pos.items() if tokens)
            if not named:
                continue
            rows += [logits[i, :, pos[c]].mean(-1) for c in named]  # (N,) each
            targets.append(token_masks(samples[i].labels["seg"], named, grid).to(logits.device))
        if rows:
            r, t = torch.stack(rows).float(), torch.cat(targets)
            focal, dc = sigmoid_focal(r, t), dice(r, t)
        else:  # no caption names a class: the flow term alone
            focal = dc = flow.new_zeros(())
        loss = cfg.flow_weight * flow + cfg.focal_weight * focal + cfg.dice_weight * dc
        return {"loss": loss, "flow": flow.detach(), "focal": focal.detach(), "dice": dc.detach()}

    def close(self) -> None:
        if self.tap is not None:
            self.tap.remove()
            self.tap = None


def add_lora(backbone: Backbone, cfg: GroundingConfig, layer: int) -> list[torch.nn.Parameter]:
    """Add the (untrained, B = 0) grounding adapter to the transformer; returns its trainable parameters."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise ImportError("LoRA fine-tuning needs peft: pip install 'mmdiff-gen[lora]'") from None
    tr = backbone.transformer
    tr.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    tr.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=lora_targets(backbone, layer),
                              init_lora_weights="gaussian"), adapter_name=ADAPTER)
    params = [p for n, p in tr.named_parameters() if f".{ADAPTER}." in n and "lora_" in n]
    for p in params:
        p.data = p.data.float()  # the adapter trains in float32 whatever the transformer's dtype
        p.requires_grad_(True)
    return params


def lora_state(backbone: Backbone) -> dict[str, torch.Tensor]:
    """The adapter's weights in diffusers' LoRA layout (what `save_lora_weights` writes)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(backbone.transformer, adapter_name=ADAPTER)


def save_lora(backbone: Backbone, out: Path) -> Path:
    """Write OUT/pytorch_lora_weights.safetensors with the pipeline's own `save_lora_weights` (atomically)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    final = out / LORA_WEIGHTS  # diffusers' default name: load_lora_weights(folder) finds it
    with atomic_path(final) as tmp:
        type(backbone.pipe).save_lora_weights(str(tmp.parent), transformer_lora_layers=lora_state(backbone),
                                              weight_name=tmp.name, safe_serialization=True)
    return final


def _settings(cfg: GroundingConfig, classes: Sequence[str]) -> dict:
    """What a resumed run must share with the saved one (its step count may grow)."""
    return {k: v for k, v in asdict(cfg).items() if k not in ("steps", "checkpoint_every")} | {"classes": list(classes)}


def _log(msg: str) -> None:
    print(f"[finetune-grounding] {msg}", file=sys.stderr, flush=True)


def finetune_grounding(backbone: Backbone, samples: Sequence[Sample], classes: Sequence[str], out: Path,
                       cfg: GroundingConfig = GroundingConfig()) -> dict:
    """Fine-tune the grounding LoRA on labelled images (every sample with "seg"); write OUT/ (the LoRA file,
    `grounding.json` with the settings and the losses). Resumes from OUT/.state.safetensors."""
    if not len(samples) or "seg" not in samples[0].labels:
        raise ValueError("grounding fine-tuning needs images with segmentation labels")
    if len(classes) < 2:
        raise ValueError("grounding fine-tuning needs the dataset's class names (background first)")
    out = Path(out)
    loss_fn = GroundingLoss(backbone, cfg, classes)
    params = add_lora(backbone, cfg, loss_fn.layer)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    state_path = out / ".state.safetensors"
    start, history = 0, []
    if state_path.is_file():
        from peft.utils import set_peft_model_state_dict

        st = load_state(state_path)
        if st.get("settings") != _settings(cfg, classes):  # more steps may extend a run; nothing else may change
            raise ValueError(f"{out} holds a fine-tuning run with other settings or classes: use another --out")
        set_peft_model_state_dict(backbone.transformer, st["lora"], adapter_name=ADAPTER)
        opt.load_state_dict(st["opt"])
        start, history = st["step"], st["history"]

    if cfg.gradient_checkpointing:
        backbone.transformer.enable_gradient_checkpointing()
    backbone.transformer.train()
    t0 = time.time()
    for step in range(start, cfg.steps):
        rng = np.random.default_rng([cfg.seed, step])
        batch = [samples[int(i)] for i in rng.integers(0, len(samples), cfg.batch_size)]
        sigma = torch.from_numpy(rng.normal(0.0, cfg.timestep_std, cfg.batch_size)).float().sigmoid()
        for group in opt.param_groups:
            group["lr"] = cfg.lr * warmup_cosine(step, cfg.steps, cfg.warmup, floor=0.0)
        terms = loss_fn(batch, sigma, noise_seed=cfg.seed * 1_000_003 + step)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        history.append({k: round(float(v.detach()), 6) for k, v in terms.items()})
        done = step + 1
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            h = history[-cfg.checkpoint_every:]
            _log(f"step {done}/{cfg.steps}: " + ", ".join(f"{k} {np.mean([x[k] for x in h]):.4f}" for k in h[0])
                 + f" ({time.time() - t0:.0f} s)")
            save_state(state_path, {"lora": lora_state(backbone), "opt": opt.state_dict(), "step": done,
                                    "history": history, "settings": _settings(cfg, classes)})
    backbone.transformer.eval()
    loss_fn.close()
    path = save_lora(backbone, out)
    record = {"config": asdict(cfg), "layer": loss_fn.layer, "classes": list(classes), "samples": len(samples),
              "backbone": {k: v for k, v in backbone.identity().items() if k != "lora"}, "history": history}
    with atomic_path(out / "grounding.json") as tmp:
        tmp.write_text(json.dumps(record, indent=1))
    return {"lora": str(path), "layer": loss_fn.layer, "first": history[0] if history else None,
            "last": history[-1] if history else None}
