"""Resumable training state as one safetensors file: tensors by path, the structure as tagged JSON, never a pickle."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .._atomic import atomic_path

FORMAT = "mmdiff-gen/state"
VERSION = "1"

# Structure encoding (JSON): None, bool, int, str and finite floats stand for themselves (JSON keeps
# 1 and 1.0 apart); a list is a JSON list; everything else is an object with one tag key. Dicts are
# item lists so that int keys (AdamW's "state" is keyed by parameter index) come back as ints, and
# tuples are tagged so that betas=(0.9, 0.999) comes back a tuple. Non-finite floats are tagged to
# keep the JSON standard.
_TAGS = ("dict", "tuple", "tensor", "float")
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor], storages: set) -> Any:
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"float": str(obj)}
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages:
            t = t.clone()  # safetensors refuses tensors that share memory (tied weights, views): store a copy
        storages.add(t.untyped_storage().data_ptr())
        key, n = path or "tensor", 1
        while key in tensors:  # a dict key holding "/" could repeat a path: keep every tensor's name unique
            key, n = f"{path}~{n}", n + 1
        tensors[key] = t
        return {"tensor": key}
    if isinstance(obj, dict):
        items = []
        for k, v in obj.items():
            if not isinstance(k, str) and (type(k) is not int):
                raise TypeError(f"state keys must be str or int, got {type(k).__name__} at {path or '/'}")
            items.append([k, _encode(v, f"{path}/{k}" if path else str(k), tensors, storages)])
        return {"dict": items}
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, f"{path}/{i}" if path else str(i), tensors, storages) for i, v in enumerate(obj)]
        return {"tuple": items} if isinstance(obj, tuple) else items
    raise TypeError(f"cannot store a {type(obj).__name__} in a state file (at {path or '/'})")


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if not isinstance(node, dict) or len(node) != 1 or next(iter(node)) not in _TAGS:
        raise ValueError(f"unknown structure node {str(node)[:60]}")
    tag, value = next(iter(node.items()))
    if tag == "tensor":
        if not isinstance(value, str) or value not in tensors:
            raise ValueError(f"missing tensor {str(value)[:60]}")
        return tensors[value]
    if tag == "float":
        if value not in _NON_FINITE:
            raise ValueError(f"bad float {str(value)[:20]}")
        return _NON_FINITE[value]
    if not isinstance(value, list):
        raise ValueError(f"bad {tag} node")
    if tag == "tuple":
        return tuple(_decode(v, tensors) for v in value)
    out = {}
    for item in value:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], (str, int))
                and not isinstance(item[0], bool)):
            raise ValueError("bad dict item")
        out[item[0]] = _decode(item[1], tensors)
    return out


def save_state(path: Path, state: Any) -> None:
    """Write `state` (dicts with str or int keys, lists, tuples, tensors, JSON scalars) to `path` atomically.

    Tensors go to CPU, contiguous; the file appears complete or not at all, whenever the process dies.
    """
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, "", tensors, set())
    meta = {"format": FORMAT, "version": VERSION, "structure": json.dumps(structure, allow_nan=False)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # on disk before the rename makes it the state
        save_file(tensors, str(tmp), metadata=meta)


def load_state(path: Path) -> Any:
    """The state saved by `save_state`, tensors on CPU; ValueError (one line) for any other file.

    Only the safetensors format and JSON are parsed, so a planted or damaged file cannot run code.
    FileNotFoundError if there is no file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no state file {path}")
    try:
        with safe_open(str(path), "pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError("no mmdiff-gen state metadata")
            if meta.get("version") != VERSION:
                raise ValueError(f"state format version {str(meta.get('version'))[:20]}, expected {VERSION}")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return _decode(json.loads(meta.get("structure", "")), tensors)
    except (SafetensorError, ValueError, TypeError, RecursionError) as e:  # JSONDecodeError is a ValueError
        reason = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise ValueError(f"{path} is not a valid training state file ({reason}); delete it to start over") from None
