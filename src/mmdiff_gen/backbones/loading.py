"""Load a frozen diffusers pipeline from a local folder or a hub id (offline is the normal case)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from .base import Backbone
from .flux import FluxBackbone

# Pipeline class name (model_index.json "_class_name") → adapter. SD3 / SD3.5 slot in here.
_ADAPTERS: dict[str, type[Backbone]] = {
    "FluxPipeline": FluxBackbone,
}


_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class BackboneNotFound(RuntimeError):
    """The weights are not on this machine; the message says how to get them."""


def _adapter_for(class_name: str) -> type[Backbone]:
    try:
        return _ADAPTERS[class_name]
    except KeyError:
        raise KeyError(
            f"unsupported pipeline {class_name!r}; supported: {', '.join(sorted(_ADAPTERS))}"
        ) from None


def _pipeline_class(name: str):
    import diffusers

    return getattr(diffusers, name)


def _read_model_index(model: str) -> tuple[str, dict]:
    """Resolve `model` to a local folder holding model_index.json, from a path or the HF cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise BackboneNotFound(f"{path} is not a diffusers pipeline folder (no model_index.json)")
        return str(path), json.loads(index.read_text())
    if not _REPO_ID.fullmatch(model):
        raise BackboneNotFound(f"no pipeline folder at {path}")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = snapshot_download(model, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        raise BackboneNotFound(
            f"{model!r} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}); on a machine with internet run "
            f"`hf download {model}` (accept the model's licence on the Hub first), or pass a local folder"
        ) from None
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        raise BackboneNotFound(f"the cached snapshot of {model!r} has no model_index.json: re-run `hf download {model}`")
    return folder, json.loads(index.read_text())


def _tiny_random(dtype: torch.dtype, device) -> Backbone:
    from .tiny import build_tiny_flux

    pipe = build_tiny_flux(seed=0)  # float32 weights
    pipe.to(device) if dtype == torch.float32 else pipe.to(device=device, dtype=dtype)
    return _adapter_for(type(pipe).__name__)(pipe, name="tiny-random")


# Short names that need no weights on disk. "tiny-random" is random weights: for smoke tests only.
BUILTIN = {"tiny-random": _tiny_random}


def load_backbone(
    model: str,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cuda",
    **pipeline_kwargs: Any,
) -> Backbone:
    """Load a frozen pipeline and wrap it in its family adapter.

    Args:
        model: a short name (see BUILTIN), a local pipeline folder, or a hub id resolved from the
            local HF cache only.
        dtype: weight dtype; bf16 on CUDA for real use, float32 on CPU.
        device: where the pipeline runs; chosen by the caller, never guessed here.
        pipeline_kwargs: passed to `from_pretrained` (e.g. `variant`).
    """
    if model in BUILTIN:
        return BUILTIN[model](dtype, device)
    folder, index = _read_model_index(model)
    adapter = _adapter_for(index.get("_class_name", "?"))
    cls = _pipeline_class(index["_class_name"])
    try:
        pipe = cls.from_pretrained(folder, torch_dtype=dtype, local_files_only=True, **pipeline_kwargs)
    except (OSError, EnvironmentError) as err:
        raise BackboneNotFound(f"could not load {model!r} from {folder}: {str(err).splitlines()[0]}") from None
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return adapter(pipe, name=model)


def wrap_pipeline(pipe: Any, name: str = "custom") -> Backbone:
    """Wrap an already-built pipeline (tests, notebooks) in its family adapter."""
    return _adapter_for(type(pipe).__name__)(pipe, name=name)
