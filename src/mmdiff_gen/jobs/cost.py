"""What one annotated generation costs, counted from configs on the meta device: the transformer's forwards under a
sampling recipe against the heads that read its features (MMDiff's claim: the heads are a rounding error).

`bench/generate_job.py` (FLUX.1-dev) and `bench/families.py` (every family's released config) print it."""

from __future__ import annotations

from ..backbones.base import Backbone
from ..backbones.flops import forward_flops
from ..heads.model import HeadConfig, head_flops
from ..tasks import get as get_task

TASKS = ("seg", "saliency", "depth")


def generation_cost(backbone: Backbone, *, size: int, steps: int, rows_per_step: int, extra_forwards: int = 1,
                    text_tokens: int | None = None, tasks: tuple[str, ...] = TASKS, num_classes: int = 21,
                    width: int | None = None, frames: int | None = None) -> dict:
    """FLOPs of one size² (size × width) generation and of the heads on its features.

    Args:
        backbone: a loaded or meta backbone (`loading.meta_backbone`, `flops.config_backbone`).
        steps, rows_per_step: sampler steps and transformer rows per step for one image (2 under classifier-free
            guidance, as separate calls or as SD3's [uncond; cond] rows; 1 for guidance-distilled models).
        extra_forwards: the contract's forwards below the schedule's last sigma (conditional only: one row each).
        text_tokens: as `flops.forward_flops`.
        tasks, num_classes: the heads (the paper's, at its defaults: 4 layers × 4 sigmas, the task's concepts).
        width, frames: a non-square size; a video family's clip length (the heads run once per latent frame;
            spreading their outputs over the decoded frames is element-wise, not counted).

    Returns {"forward": one forward of one row, "generation", "heads": {task (and "seg+saliency+depth", one unified
    head reading every task's concepts): FLOPs}, "heads_share": the separate heads over the generation,
    "unified_share"}.
    """
    width = width or size
    grid = backbone.token_grid(size, width, frames)
    forward = forward_flops(backbone, rows=1, height=size, width=width, text_tokens=text_tokens, frames=frames)
    generation = (steps * rows_per_step + extra_forwards) * forward  # FLOPs are linear in rows

    def cost(names: tuple[str, ...]) -> int:
        concepts = list(dict.fromkeys(w for t in names for w in get_task(t).concepts))
        cfg = HeadConfig(tasks=names, feature_dim=backbone.feature_dim, num_layers=4, num_timesteps=4,
                         num_concepts=len(concepts), num_classes=num_classes if "seg" in names else 1)
        return head_flops(cfg, grid, (size, width))

    heads = {t: cost((t,)) for t in tasks} | {"+".join(tasks): cost(tuple(tasks))}
    return {"forward": forward, "generation": generation, "heads": heads,
            "heads_share": sum(heads[t] for t in tasks) / generation, "unified_share": heads["+".join(tasks)] / generation}
