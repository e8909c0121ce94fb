"""Per-sample feature dumps: KEY.png, KEY.safetensors (features and maps), KEY.json (provenance)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .._atomic import atomic_path


def _atomic_write(path: Path, write) -> None:
    with atomic_path(path) as tmp:
        write(tmp)


def save_sample(out: Path, key: str, image: Any, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write one sample's three files; each appears whole or not at all (write then rename).

    Args:
        out: output folder.
        key: file stem (digits).
        image: a PIL image.
        tensors: name → tensor, e.g. features (L, T, N, C), concept_maps (T, K, N).
        meta: JSON-able provenance (prompt, seed, sigmas received, layers, backbone identity).
    """
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / f"{key}.png", lambda p: image.save(p, format="PNG"))
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic_write(out / f"{key}.safetensors", lambda p: save_file(flat, str(p)))
    _atomic_write(out / f"{key}.json", lambda p: p.write_text(json.dumps(meta, indent=1)))


def load_sample(out: Path, key: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and metadata of one dumped sample."""
    return load_file(str(Path(out) / f"{key}.safetensors")), json.loads((Path(out) / f"{key}.json").read_text())
