"""Which samples exist, their seeds, how large shards are and who the worker is (which shards it owns: _workers).

Everything here is a pure function of the inputs, so any worker, on any node, at any time, derives
the same plan: that is what makes resume and many independent workers agree sample for sample.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class PlannedSample:
    """Sample `index` is repeat `repeat` of prompt `prompt_index`; it owns one generator seeded `seed`."""

    index: int
    prompt_index: int
    repeat: int
    prompt: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.index:09d}"


SEED_POLICY = "seed of sample = numpy SeedSequence([seed, prompt_index, repeat]).generate_state(1, uint64)[0] mod 2^63"


def read_prompts(path: str | Path) -> list[str]:
    """A prompts file: non-blank lines, stripped; lines whose first non-blank character is `#` are comments.
    ValueError (one line) when it cannot be read or holds no prompt."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except IsADirectoryError:
        raise ValueError(f"prompts file {path} is a folder") from None
    except FileNotFoundError:
        raise ValueError(f"prompts file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read prompts file {path}: {type(e).__name__}: {e}") from None
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"prompts file {path} has no prompts")
    return prompts


def sample_seed(seed: int, prompt_index: int, repeat: int) -> int:
    """A per-sample seed that does not depend on batch size, shard size or worker count."""
    return int(np.random.SeedSequence([seed, prompt_index, repeat]).generate_state(1, np.uint64)[0] % (1 << 63))


def plan_samples(prompts: list[str], images_per_prompt: int, seed: int) -> list[PlannedSample]:
    """Samples in key order: prompt-major, then repeat."""
    return [PlannedSample(p * images_per_prompt + r, p, r, text, sample_seed(seed, p, r))
            for p, text in enumerate(prompts) for r in range(images_per_prompt)]


def default_shard_size(height: int, width: int) -> int:
    """Samples per shard when none is given: about 5 minutes of one GPU's time for FLUX.1-dev at 28 steps
    (≈ 1.3 s per 512² image and ≈ 5 s per 1024² on an H100, from its pixel count), so a requeue or a
    SIGUSR1 loses minutes, not hours; 16–1000."""
    return int(min(1000, max(16, round(256 * (512 * 512) / (height * width)))))


_RANK_VARS = (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS"),
              ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"))


def worker_identity(rank: int | None = None, world_size: int | None = None,
                    env: dict[str, str] | None = None) -> tuple[int, int, str]:
    """(rank, world size, where they came from): flags, else torchrun / accelerate, else SLURM, else job arrays."""
    env = os.environ if env is None else env
    r, w, src = 0, 1, "single worker"
    for rk, wk in _RANK_VARS:
        if rk in env and wk in env:
            r, w, src = int(env[rk]), int(env[wk]), f"{rk}/{wk}"
            if rk == "SLURM_ARRAY_TASK_ID":
                r -= int(env.get("SLURM_ARRAY_TASK_MIN", 0))  # arrays may start at 1
            break
    if rank is not None or world_size is not None:  # a flag overrides its own value only
        r = r if rank is None else rank
        w = w if world_size is None else world_size
        src = "flags" if src == "single worker" else f"flags and {src}"
    if w < 1 or not 0 <= r < w:
        raise ValueError(f"worker rank {r} is not in 0…{w - 1} (from {src})")
    return r, w, src


def local_device(device: str, env: dict[str, str] | None = None) -> str:
    """`cuda` means this worker's GPU: LOCAL_RANK (torchrun) or SLURM_LOCALID picks it, unless the scheduler
    already made one GPU visible per worker (CUDA_VISIBLE_DEVICES with one entry). Explicit indices stay."""
    env = os.environ if env is None else env
    if device != "cuda":
        return device
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    local = env.get("LOCAL_RANK", env.get("SLURM_LOCALID"))
    if local is None or len(visible) == 1:
        return device
    return f"cuda:{int(local)}"
