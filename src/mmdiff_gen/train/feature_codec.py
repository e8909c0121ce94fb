"""How a feature cache stores features: as captured (bf16), or in 8 bits with a float32 scale per token.

8 bits halve the cache (96 → 48 MiB per 512² FLUX.1-dev image at the paper's 4 layers × 4 sigmas). The values
are int8 (uniform steps of scale / 127) or float8 e4m3 (3 mantissa bits: a relative step, so a token's small
channels keep their precision beside its large ones). Each token of each layer and sigma gets its own scale
(absmax over its channels), 4 bytes per 3 072 channels at FLUX widths. Decoding happens where a batch is read,
after it has moved to the training device, so the host and the bus carry 8 bits too.

BENCHMARKS.md "Compact feature caches" measures the codecs (and a scale per channel instead) on the toy backbone.
"""

from __future__ import annotations

import math

import torch

CODECS = ("bf16", "int8", "fp8")
# What `extract`, `train` and the recipes store unless told otherwise: on the toy backbone the heads score the same
# on int8 features, decoded or retrained (BENCHMARKS.md), at half the disk. `build_cache` itself keeps bf16, so
# caches written before codecs resume as they are.
DEFAULT = "int8"
# The largest magnitude each 8-bit code represents: int8's symmetric range; float8_e4m3fn's largest finite value.
_QMAX = {"int8": 127.0, "fp8": 448.0}
# Scales per token: the absmax over the last (channel) axis. "channel" (absmax over the tokens, axis -2) is kept
# for the benchmark's comparison only.
SCALE_AXIS = {"token": -1, "channel": -2}


def check_codec(codec: str) -> str:
    if codec not in CODECS:
        raise ValueError(f"feature codec must be one of {', '.join(CODECS)}, got {codec!r}")
    return codec


def stored_bytes(shape: tuple[int, ...], codec: str, itemsize: int = 2) -> int:
    """Bytes `encode` stores for features of `shape` (..., N, C) with a scale per token: `itemsize` bytes a value as
    captured (bf16: 2), 1 in 8 bits plus a float32 scale per token. The disk arithmetic of a cost plan."""
    n = math.prod(shape)
    return n * itemsize if check_codec(codec) == "bf16" else n + n // shape[-1] * 4


def encode(features: torch.Tensor, codec: str, per: str = "token") -> dict[str, torch.Tensor]:
    """{"features": stored values} and, for an 8-bit codec, {"features_scale": float32 scales}.

    Args:
        features: (..., N, C), e.g. (B, L, T, N, C) as captured.
        codec: "bf16" (stored as given), "int8" or "fp8".
        per: "token" (scale (..., N, 1)) or "channel" (scale (..., 1, C)).
    """
    if check_codec(codec) == "bf16":
        return {"features": features}
    x = features.float()
    absmax = x.abs().amax(SCALE_AXIS[per], keepdim=True)
    scale = (absmax / _QMAX[codec]).clamp(min=torch.finfo(torch.float32).tiny)  # an all-zero token stays zero
    y = x / scale
    q = y.round_().clamp_(-127, 127).to(torch.int8) if codec == "int8" else y.to(torch.float8_e4m3fn)
    return {"features": q, "features_scale": scale}


def decode(batch: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The batch with 8-bit features turned back into `dtype` (values × their scale); others as they are."""
    scale = batch.pop("features_scale", None)
    if scale is not None:
        batch["features"] = (batch["features"].to(scale.dtype) * scale).to(dtype)
    return batch
