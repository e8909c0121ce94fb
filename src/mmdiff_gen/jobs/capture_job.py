"""Generate images for a prompt list and dump their captured features, batch by batch (split among workers)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..backbones.base import Backbone
from ..capture import CaptureSpec, generate
from ..io.features import save_sample
from .dataset_job import check_sampling


@dataclass(frozen=True)
class CaptureJob:
    """Args:
        out: output folder.
        seed: global seed; prompt i uses seed + i.
        batch_size: prompts per generation pass.
        height, width, num_inference_steps, guidance_scale, true_cfg_scale, max_sequence_length: sampling
            settings; None: the backbone's (`Backbone.sampling_kwargs`).
    """

    out: Path
    seed: int = 0
    batch_size: int = 4
    height: int | None = None
    width: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    true_cfg_scale: float | None = None
    max_sequence_length: int | None = None

    def __post_init__(self):  # the dataset job's checks, before a backbone loads: one line naming the option
        check_sampling(**{k: getattr(self, k) for k in ("batch_size", "height", "width", "num_inference_steps",
                                                          "guidance_scale", "true_cfg_scale")})


def run_capture(
    backbone: Backbone,
    prompts: Sequence[str],
    spec: CaptureSpec,
    job: CaptureJob,
    on_batch: Callable[[int], None] | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> int:
    """Generate every prompt once and write KEY.png / .safetensors / .json per sample. Returns the count written.

    With `world_size` workers on one folder, worker `rank` takes batches b ≡ rank (mod world_size) of the
    single-worker batching, so the workers together write exactly the files of one worker.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"worker rank {rank} is not in 0…{world_size - 1}")
    written = 0
    for start in range(rank * job.batch_size, len(prompts), job.batch_size * world_size):
        batch = list(prompts[start : start + job.batch_size])
        seeds = [job.seed + start + i for i in range(len(batch))]
        gen = generate(
            backbone, batch, spec, seeds=seeds, height=job.height, width=job.width,
            num_inference_steps=job.num_inference_steps, guidance_scale=job.guidance_scale,
            true_cfg_scale=job.true_cfg_scale, max_sequence_length=job.max_sequence_length,
        )
        cap = gen.capture
        for i, (prompt, image) in enumerate(zip(batch, gen.images)):
            one = cap.sample(i)
            tensors = {"features": one.features[0]}
            if one.concept_maps is not None:
                tensors["concept_maps"] = one.concept_maps[0]
            if one.cross_attention is not None:
                tensors["cross_attention"] = one.cross_attention[0]
            meta = {
                "prompt": prompt,
                "prompt_index": start + i,
                "seed": seeds[i],
                "sigmas": [float(s) for s in one.sigmas[0]],
                "layers": list(cap.layers),
                "grid": list(cap.grid),
                "concepts": list(cap.concepts),
                "backbone": backbone.identity(),
                "spec": spec.to_dict(),
                "schedule_sigmas": list(gen.schedule.sigmas),
                "extra_forwards": gen.schedule.extra_forwards,
            }
            save_sample(job.out, f"{start + i:09d}", image, tensors, meta)
            written += 1
        if on_batch is not None:
            on_batch(len(batch))
    return written
