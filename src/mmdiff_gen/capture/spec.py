"""What to capture: layers, sigmas, storage, concepts. A frozen config saved beside every sample."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from ..errors import SettingsError
from ..tasks import get as get_task

# MMDiff §3.1: t = 1 is noise, 0 is clean.
PAPER_SIGMAS: tuple[float, ...] = (0.78, 0.52, 0.26, 0.001)

BLOCKS = ("feature", "joint")  # what CaptureSpec.layers may index (Backbone.blocks)
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class CaptureSpec:
    """What one generation pass (or real-image extraction) records.

    Args:
        layers: indices into the `blocks` list; None = the backbone's default spread (FLUX.1-dev's
            single-stream blocks: 4, 15, 26, 37).
        blocks: which blocks `layers` index: "feature" (the backbone's feature blocks: FLUX's
            single-stream blocks) or "joint" (its text-image blocks: FLUX's double-stream blocks, the
            paper's Table 5 first row; for SD3 both are its joint blocks).
        sigmas: target sigmas, noisiest first after normalisation (paper: 0.78, 0.52, 0.26, 0.001).
        store_dtype: "bfloat16" (default: FLUX's massive activations overflow float16), "float16"
            or "float32".
        store_device: where captured tensors go ("cpu" to free the GPU); None keeps them where the
            backbone produced them.
        concepts: concept words for concept attention; empty disables the concept stream.
        concept_layers: joint-block indices whose maps are averaged; None = the backbone default.
        cross_attention: also record the averaged text→image cross-attention map (ablation baseline).
        text_attention_layers: blocks (Backbone.attention_blocks indices) whose image→text attention
            is recorded per prompt token (Seg4Diff's zero-shot segmentation, the layer probe).
    """

    layers: tuple[int, ...] | None = None
    blocks: str = "feature"
    sigmas: tuple[float, ...] = PAPER_SIGMAS
    store_dtype: str = "bfloat16"
    store_device: str | None = None
    concepts: tuple[str, ...] = ()
    concept_layers: tuple[int, ...] | None = None
    cross_attention: bool = False
    text_attention_layers: tuple[int, ...] = ()

    def __post_init__(self):
        sig = tuple(sorted({float(s) for s in self.sigmas}, reverse=True))
        if not sig or any(not (0.0 < s <= 1.0) for s in sig):
            raise SettingsError(f"sigmas must lie in (0, 1], got {self.sigmas}")
        if len(sig) != len(self.sigmas):
            raise ValueError(f"sigmas must be distinct, got {self.sigmas}")
        object.__setattr__(self, "sigmas", sig)
        if self.blocks not in BLOCKS:
            raise ValueError(f"blocks must be one of {', '.join(BLOCKS)}, got {self.blocks!r}")
        if self.store_dtype not in _DTYPES:
            raise ValueError(f"store_dtype must be one of {', '.join(_DTYPES)}, got {self.store_dtype!r}")
        for name in ("layers", "concept_layers", "text_attention_layers"):
            v = getattr(self, name)
            if v is not None and (v or name != "text_attention_layers"):
                v = tuple(int(i) for i in v)
                if not v or len(set(v)) != len(v) or min(v) < 0:
                    raise ValueError(f"{name} must be distinct non-negative indices, got {v}")
                object.__setattr__(self, name, tuple(sorted(v)))
        words = tuple(str(w).strip() for w in self.concepts)
        if any(not w or " " in w for w in words) or len(set(words)) != len(words):
            raise ValueError(f"concepts must be distinct single words, got {self.concepts}")
        object.__setattr__(self, "concepts", words)

    @property
    def torch_store_dtype(self) -> torch.dtype:
        return _DTYPES[self.store_dtype]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def for_tasks(cls, tasks: Sequence[str], **kwargs) -> "CaptureSpec":
        """A spec whose concepts are the union of the tasks' concept sets (the registry's), in first-seen order."""
        words: list[str] = []
        for t in tasks:
            words += [w for w in get_task(t).concepts if w not in words]
        return cls(concepts=tuple(words), **kwargs)
