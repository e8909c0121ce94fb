"""The whole toy recipe as resumable phases: data → vae → oracle → text encoders → dit (transformer) → export."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import torch

from .data import load_or_render
from .recipe import ToyRecipe

PHASES = ("vae", "oracle", "text", "dit", "export")
DEFAULT_WORK = Path.home() / ".cache" / "mmdiff-gen" / "toy"  # outside the repo: checkpoints survive re-checkouts


def _phase_list(phases: Sequence[str]) -> list[str]:
    bad = [p for p in phases if p not in PHASES]
    if bad:
        raise KeyError(f"unknown phase {bad[0]!r}; phases: {', '.join(PHASES)}")
    return [p for p in PHASES if p in phases]


def train_toy(
    work: Path = DEFAULT_WORK,
    recipe: ToyRecipe = ToyRecipe(),
    phases: Sequence[str] = PHASES,
    steps: int | None = None,
    out: Path | None = None,
    compile: bool = False,
) -> dict:
    """Run the chosen phases in order; each resumes from its checkpoint in `work`.

    Args:
        work: folder for the data cache and checkpoints (never committed).
        recipe: the recipe.
        phases: a subset of PHASES.
        steps: override every phase's step count (smoke runs).
        out: where `export` writes the pipeline folder (default: the packaged asset folder).
        compile: run the transformer through torch.compile in the dit phase.
    Returns:
        wall seconds per phase, also appended to work/timings.jsonl.
    """
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    saved, current = work / "recipe.json", json.loads(json.dumps(recipe.to_dict()))  # tuples as JSON lists
    if saved.is_file():  # checkpoints here belong to the recipe that started them
        started = json.loads(saved.read_text())
        differ = sorted(k for k, v in current.items() if v != started.get(k))
        if differ:
            raise ValueError(f"{work} holds a run of another recipe (it differs in {', '.join(differ)}); "
                             f"resume it with --recipe {saved}, or start in another --work folder")
    saved.write_text(json.dumps(current, indent=1))
    torch.manual_seed(recipe.seed)
    timings: dict[str, float] = {}
    t = time.time()
    data = load_or_render(work / "scenes.npz", recipe.data_seed, recipe.train_scenes)
    timings["data"] = time.time() - t
    pipe = recipe.build_pipeline()
    for phase in _phase_list(phases):
        t = time.time()
        if phase == "vae":
            from .train_vae import train_vae

            train_vae(pipe.vae, data, recipe, work, steps)
        elif phase == "text":
            from .train_text import train_text

            train_text(pipe, data, recipe, work, steps)
        else:
            _load_vae(pipe.vae, work, data)
            if phase == "dit":
                from .train_dit import train_dit

                train_dit(pipe, data, recipe, work, steps, compile)
            elif phase == "oracle":
                from .oracle import train_oracle

                train_oracle(pipe.vae, data, recipe, work, steps)
            elif phase == "export":
                from .export import export_toy

                export_toy(pipe, recipe, work, out)
        timings[phase] = time.time() - t
    with open(work / "timings.jsonl", "a") as f:
        f.write(json.dumps(timings) + "\n")
    return timings


def _load_vae(vae, work: Path, data) -> None:
    from ._loop import Checkpoint
    from .train_vae import set_latent_stats

    Checkpoint(work, "vae").restore(vae)
    set_latent_stats(vae, data)
