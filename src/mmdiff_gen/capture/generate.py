"""One generation pass that yields images and their features at exactly the configured sigmas."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..backbones.base import Backbone
from ..backbones.schedule import ContractSchedule, contract_schedule
from ._noise import generators_for, noise_to, per_sample_noise
from .session import Capture, CaptureResult
from .spec import CaptureSpec


@dataclass
class Generation:
    """Images of one batch with what the pass captured.

    Attributes:
        images: the pipeline's output (PIL images by default), one per prompt; a video backbone's: the frames of
            one clip per prompt.
        capture: features, sigmas received and maps, per image.
        schedule: the contract schedule the sampler followed (pass its `pipeline_sigmas` as
            `sigmas=` to a plain pipeline call to reproduce the images bit for bit).
        seeds: the per-image seeds.
    """

    images: Any
    capture: CaptureResult
    schedule: ContractSchedule
    seeds: list[int]


def plan_schedule(backbone: Backbone, spec: CaptureSpec, num_inference_steps: int, height: int, width: int,
                  frames: int | None = None) -> ContractSchedule:
    """The contract schedule for this size (and clip length) and step count (see backbones.schedule)."""
    tokens = math.prod(backbone.token_grid(height, width, frames))
    schedule = contract_schedule(backbone.pipe.scheduler, num_inference_steps, spec.sigmas,
                                 backbone.schedule_mu(tokens, num_inference_steps))
    backbone.check_schedule(schedule)
    return schedule


@torch.no_grad()
def generate(
    backbone: Backbone,
    prompts: Sequence[str],
    spec: CaptureSpec,
    *,
    seeds: Sequence[int],
    height: int | None = None,
    width: int | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    true_cfg_scale: float | None = None,
    negative_prompt: str | Sequence[str] | None = None,
    max_sequence_length: int | None = None,
    num_frames: int | None = None,
    output_type: str = "pil",
) -> Generation:
    """Generate one image per prompt and capture features at the spec's sigmas in the same pass.

    The transformer runs exactly as often as the sampler needs, plus one forward per target sigma
    below the schedule's last step (the default 0.001 is one). The unconditional branch of true CFG
    is never captured. Which call is captured comes from the planned schedule (nothing is read back
    from the device per step), so this works as well in a compiled transformer (`compile_backbone`).

    Args:
        backbone: the wrapped pipeline.
        prompts: B prompts, one image each.
        spec: what to capture.
        seeds: B seeds; image b uses its own CPU generator seeded with seeds[b].
        height, width: image size in pixels.
        num_inference_steps, guidance_scale, true_cfg_scale, negative_prompt, output_type: as in FluxPipeline
            (SD3: guidance_scale is its classifier-free guidance and true_cfg_scale must stay 1).
        max_sequence_length: text tokens.
        num_frames: a video backbone's clip length (4k + 1 for Wan; None: its default); not for images.
        Sampling settings left None are the backbone's (`Backbone.sampling_kwargs`: its mmdiff.json
        recommendation, else the FLUX defaults); true CFG without a negative prompt uses "".
    """
    prompts = list(prompts)
    seeds = [int(s) for s in seeds]
    s = backbone.sampling_kwargs(height=height, width=width, num_inference_steps=num_inference_steps,
                                 guidance_scale=guidance_scale, true_cfg_scale=true_cfg_scale,
                                 negative_prompt=negative_prompt, max_sequence_length=max_sequence_length,
                                 num_frames=num_frames)
    height, width, num_inference_steps = s["height"], s["width"], s["num_inference_steps"]
    frames = s.get("num_frames")  # None for an image backbone
    guidance_scale, true_cfg_scale, max_sequence_length = s["guidance_scale"], s["true_cfg_scale"], s["max_sequence_length"]
    negative_prompt = s["negative_prompt"] if true_cfg_scale > 1 else None
    if len(seeds) != len(prompts):
        raise ValueError(f"need one seed per prompt: {len(prompts)} prompts, {len(seeds)} seeds")
    schedule = plan_schedule(backbone, spec, num_inference_steps, height, width, frames)
    generators = generators_for(seeds)
    text_mask = backbone.text_token_mask(prompts, max_sequence_length) if spec.cross_attention else None

    final: dict[str, torch.Tensor] = {}
    b = len(prompts)
    cfg = backbone.cfg_in_batch({"guidance_scale": guidance_scale})
    rows = 2 * b if cfg else b  # rows of each call (SD3's CFG batches [uncond; cond])
    last = num_inference_steps - 1

    def before_step(cap: Capture, step: int) -> None:
        """Arm step `step`'s first (conditional) call if the plan puts a target there; the call of the
        last step also hands its conditioning to the extra forward."""
        cap.arm([schedule.sigmas[step]] * rows)
        cap.hooks.keep_kwargs = bool(schedule.extra) and step == last

    def after_step(_pipe, step, _t, kwargs):  # the pipeline's step-end callback: eager, between calls
        cap.collect()
        if step < last:
            before_step(cap, step + 1)
        else:
            final["latents"] = kwargs["latents"]
        return kwargs

    with Capture(backbone, spec, batch_size=b, height=height, width=width, frames=frames, text_mask=text_mask,
                 cfg_in_batch=cfg, planned=True) as cap:
        before_step(cap, 0)
        images = backbone.run_pipeline(
            prompt=prompts,
            negative_prompt=negative_prompt,
            true_cfg_scale=true_cfg_scale,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            sigmas=list(schedule.pipeline_sigmas),
            guidance_scale=guidance_scale,
            generator=generators,
            max_sequence_length=max_sequence_length,
            output_type=output_type,
            callback_on_step_end=after_step,
            **({} if frames is None else {"num_frames": frames}),
        )
        if schedule.extra:
            x0 = final["latents"]  # clean latents: (B, N, C) packed (FLUX), (B, C, h, w) (SD3), (B, C, f, h, w) (Wan)
            noise = per_sample_noise(tuple(x0.shape[1:]), generators, x0.device, x0.dtype)
            for sigma in schedule.extra:
                cap.forward_at(noise_to(x0, noise, sigma), sigma)
            # Under model offload the pipeline freed its models as it returned; the extra forward moved the
            # transformer back in: free it again, or the next batch's text encoders join it on the GPU.
            backbone.pipe.maybe_free_model_hooks()
    return Generation(images=images, capture=cap.result(), schedule=schedule, seeds=seeds)
