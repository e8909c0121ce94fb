"""Phase 5 of the toy recipe: write the trained pipeline as a standard diffusers folder with its settings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..backbones.loading import SETTINGS_FILE
from ._loop import Checkpoint
from .recipe import ASSET_DIR, ToyRecipe
from .world import CLASSES, PALETTE


def export_toy(pipe, recipe: ToyRecipe, work: Path, out: Path | None = None) -> Path:
    """Load the EMA weights of work/dit.state.safetensors into `pipe` and save it (safetensors) with mmdiff.json."""
    modules = torch.nn.ModuleDict({"transformer": pipe.transformer, "clip": pipe.text_encoder, "t5": pipe.text_encoder_2})
    step = load_ema(modules, work)
    settings = {
        "name": "toy",
        "sampling": {
            "height": 64, "width": 64, "num_inference_steps": recipe.sample_steps,
            "true_cfg_scale": recipe.true_cfg_scale, "negative_prompt": "", "guidance_scale": 1.0,
            "max_sequence_length": recipe.t5_max_length,
        },
        "capture_layers": None,  # the backbone's spread over its 8 single-stream blocks: 1, 3, 5, 7
        "trained_steps": {"dit": step},
        "recipe": recipe.to_dict(),
    }
    return save_pipeline(pipe, Path(out) if out is not None else ASSET_DIR, settings,
                         (pipe.tokenizer, pipe.tokenizer_2))


def load_ema(modules: torch.nn.Module, work: Path) -> int:
    """The EMA weights of work/dit.state.safetensors into `modules` (frozen, eval); returns the step they reached."""
    state = Checkpoint(work, "dit").load()
    if state is None:
        raise FileNotFoundError(f"no trained transformer in {work}: run the dit phase first")
    modules.load_state_dict(state["ema"])
    modules.eval().requires_grad_(False)
    return int(state["step"])


def save_pipeline(pipe, out: Path, settings: dict, tokenizers) -> Path:
    """`pipe` as a diffusers folder (safetensors) with `settings` and the world's classes, palette and depth unit in
    its mmdiff.json, written beside `out` and renamed into place."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # Padded calls during training leave padding and truncation set in the fast tokenizers' backends,
    # and save_pretrained would write them into tokenizer.json; the shipped files stay as built.
    for tok in tokenizers:
        tok.backend_tokenizer.no_padding()
        tok.backend_tokenizer.no_truncation()
    pipe.save_pretrained(tmp, safe_serialization=True)
    settings = {**settings, "classes": list(CLASSES), "palette": [list(c) for c in PALETTE], "depth_unit": "metre"}
    (tmp / SETTINGS_FILE).write_text(json.dumps(settings, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
