"""`inspect` and `capture`: look at a backbone's geometry and schedule; dump features of generated images."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ._errors import clean_errors, fail
from ._options import (Blocks, Compile, Device, Dtype, Lora, LoraScale, Model, Offload, Storage, check_compile,
                       check_runtime, compile_if, output_file, read_prompts, resolve_device, torch_dtype, worker)

out = Console()


def _layers(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"layers must be comma-separated integers, got {text!r}",
                                 param_hint="'--layers'") from None


def _sigmas(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"sigmas must be comma-separated numbers, got {text!r}",
                                 param_hint="'--sigmas'") from None


def _concepts(text: str | None) -> tuple[str, ...]:
    """A trained task's name (its concept set: seg, saliency, depth) or comma-separated words."""
    from .. import tasks

    if not text:
        return ()
    if text in tasks.trained():
        return tasks.get(text).concepts
    return tuple(w.strip() for w in text.split(",") if w.strip())


def inspect(
    model: Model = "toy",
    size: Annotated[int | None, typer.Option(help="Image side in pixels [backbone's recommendation, else 512].")] = None,
    steps: Annotated[int | None, typer.Option(help="Sampler steps [backbone's recommendation, else 28].")] = None,
    sigmas: Annotated[str | None, typer.Option(help="Target sigmas, comma-separated [the backbone's: the paper's "
                                                    "0.78,0.52,0.26,0.001; FLUX.2 [klein] distilled 0.001].")] = None,
    device: Device = "cpu",
    dtype: Dtype = "float32",
) -> None:
    """Show a backbone's capture geometry and the schedule that honours the target sigmas."""
    targets = None if sigmas is None else _sigmas(sigmas)
    dev = resolve_device(device)
    from ..backbones import load_backbone
    from ..capture import CaptureSpec, plan_schedule

    with clean_errors():
        bb = load_backbone(model, dtype=torch_dtype(dtype, dev), device=dev)
        spec = CaptureSpec(sigmas=targets or bb.default_sigmas or CaptureSpec().sigmas)
        kw = bb.sampling_kwargs(height=size, width=size, num_inference_steps=steps)
        height, width, steps, frames = kw["height"], kw["width"], kw["num_inference_steps"], kw.get("num_frames")
        plan = plan_schedule(bb, spec, steps, height, width, frames)
        grid = bb.token_grid(height, width, frames)  # (h, w), a clip's (f, h, w)
    at = f"{height}×{width}" + (f", {frames} frames" if frames else "")
    t = Table(title=f"{bb.name} ({bb.family})", show_header=False)
    t.add_row("feature blocks", str(len(bb.feature_blocks)))
    t.add_row("joint blocks", str(len(bb.joint_blocks)))
    t.add_row("default capture layers", ", ".join(map(str, bb.default_layers())))
    t.add_row("default concept layers", ", ".join(map(str, bb.default_concept_layers())))
    t.add_row("feature width", str(bb.feature_dim))
    n = math.prod(grid)
    t.add_row(f"tokens at {at}", f"{'×'.join(map(str, grid))} = {n} ({bb.pixels_per_token} px per token)")
    n_layers = len(bb.default_layers())
    per = n_layers * len(spec.sigmas) * n * bb.feature_dim * 2
    t.add_row(f"bf16 features per {'clip' if frames else 'image'}",
              f"{per / 2**20:.2f} MiB ({n_layers} layers × {len(spec.sigmas)} sigmas)")
    out.print(t)
    s = Table(title=f"timestep contract, {steps} steps at {at}")
    for col in ("target σ", "default nearest σ", "captured at"):
        s.add_column(col)
    for target in spec.sigmas:
        nearest = min(plan.default_sigmas, key=lambda x: abs(x - target))
        where = f"step {plan.steps[target]} (placed)" if target in plan.steps else "extra forward on the final latent"
        s.add_row(f"{target:g}", f"{nearest:.4f}", where)
    out.print(s)
    out.print(f"transformer forwards: {steps} sampler steps + {plan.extra_forwards} extra")


def capture(
    prompts: Annotated[Path, typer.Option(help="Text file, one prompt per line (blank lines and lines starting "
                                               "with # are skipped).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder.")],
    model: Model = "toy",
    size: Annotated[int | None, typer.Option(help="Image side in pixels [backbone's recommendation, else 512].")] = None,
    steps: Annotated[int | None, typer.Option(help="Sampler steps [backbone's recommendation, else 28].")] = None,
    guidance: Annotated[float | None, typer.Option(help="FLUX distilled guidance [recommendation, else 3.5].")] = None,
    true_cfg: Annotated[float | None, typer.Option(help="True CFG scale, 1 = off [recommendation, else 1].")] = None,
    layers: Annotated[str | None, typer.Option(help="Block indices, comma-separated (default: spread).")] = None,
    blocks: Blocks = "feature",
    sigmas: Annotated[str, typer.Option(help="Target sigmas, comma-separated.")] = "0.78,0.52,0.26,0.001",
    concepts: Annotated[str | None, typer.Option(help="Task name (seg, saliency, depth) or comma-separated words.")] = None,
    batch_size: Annotated[int, typer.Option(help="Prompts per generation pass.")] = 4,
    seed: Annotated[int, typer.Option(help="Global seed; prompt i uses seed + i.")] = 0,
    max_sequence_length: Annotated[int, typer.Option(help="T5 tokens.")] = 512,
    compile: Compile = "off",
    device: Device = "auto",
    dtype: Dtype = "auto",
    offload: Offload = "none",
    storage: Storage = "full",
    lora: Lora = None,
    lora_scale: LoraScale = 1.0,
) -> None:
    """Generate each prompt once and dump its image, captured features and concept maps.

    Many GPUs: one process per GPU on the same --out (torchrun, srun); worker r takes batches b ≡ r (mod W)."""
    texts = read_prompts(prompts)
    if batch_size < 1:
        fail("--batch-size must be ≥ 1", code=2)
    dev, r, w, source = worker(device)
    check_runtime(offload, storage, dev)
    from ..backbones import load_backbone
    from ..capture import CaptureSpec
    from ..jobs.capture_job import CaptureJob, run_capture
    from ..jobs.dataset_job import check_sampling

    check_compile(compile, offload)
    with clean_errors():
        check_sampling(num_inference_steps=steps, height=size, width=size, guidance_scale=guidance,
                       true_cfg_scale=true_cfg)  # before loading: one line naming the option, exit 2
        spec = CaptureSpec(layers=_layers(layers), blocks=blocks, sigmas=_sigmas(sigmas), concepts=_concepts(concepts), store_device="cpu")
        bb = load_backbone(model, dtype=torch_dtype(dtype, dev), device=dev, offload=offload, storage=storage,
                           lora=lora, lora_scale=lora_scale)
        compile_if(bb, compile)
        kw = bb.sampling_kwargs(height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
                                true_cfg_scale=true_cfg, max_sequence_length=max_sequence_length)
        kw.pop("negative_prompt")  # generate uses "" whenever true CFG is on
        job = CaptureJob(out=out_dir, seed=seed, batch_size=batch_size, **kw)
        if w > 1:
            out.print(f"worker {r} of {w} ({source}) on {dev}", highlight=False, soft_wrap=True)
        n = run_capture(bb, texts, spec, job, rank=r, world_size=w)
    out.print(f"wrote {n} samples to {out_dir} (KEY.png, KEY.safetensors, KEY.json)")


def probe_layers(
    data: Annotated[str, typer.Option(help="Labelled images with captions naming their objects (dataset source, "
                                           "as for extract: voc:PATH, folder:PATH, a files-layout folder…).")],
    model: Model = "toy",
    split: Annotated[str | None, typer.Option(help="Dataset split.")] = None,
    size: Annotated[int | None, typer.Option(help="Resize + center-crop to SIZE×SIZE.")] = None,
    captions: Annotated[Path | None, typer.Option(help="JSONL of {\"key\", \"caption\"} lines.")] = None,
    classes: Annotated[str | None, typer.Option(help="Comma-separated class names, background first "
                                                     "[the dataset's classes].")] = None,
    sigmas: Annotated[str, typer.Option(help="Sigmas to probe.")] = "0.78,0.52,0.26,0.001",
    n: Annotated[int, typer.Option("--n", help="Samples to score.")] = 200,
    batch_size: Annotated[int, typer.Option()] = 16,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full table here.")] = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    offload: Offload = "none",
    storage: Storage = "full",
    lora: Lora = None,
    lora_scale: LoraScale = 1.0,
) -> None:
    """Find the expert layer: zero-shot segmentation mIoU of every block's image→text attention × sigma.

    Many GPUs: one process per GPU (torchrun, srun) with --json; worker r scores batches b ≡ r (mod W) and leaves
    its counts beside the JSON file, worker 0 merges them and writes the table."""
    import json

    if json_out is not None:  # before minutes of probing
        output_file(json_out, "--json")
    dev, r, w, source = worker(device)
    if w > 1 and json_out is None:
        fail(f"{w} workers ({source}) need --json: each leaves its scores beside it for worker 0 to merge", code=2)
    check_runtime(offload, storage, dev)
    from ..backbones import load_backbone
    from ..io.datasets import open_dataset
    from ..jobs.probe import describe_layer, gather_scores, probe_scores

    with clean_errors():
        ds = open_dataset(data, split=split, size=size, captions=captions)
        names = [c.strip() for c in classes.split(",")] if classes else list(ds.classes)
        if len(names) < 2:
            fail("--classes is required: the dataset records no class names", code=2)
        bb = load_backbone(model, dtype=torch_dtype(dtype, dev), device=dev, offload=offload, storage=storage,
                           lora=lora, lora_scale=lora_scale)
        if w > 1:
            out.print(f"worker {r} of {w} ({source}) on {dev}", highlight=False, soft_wrap=True)
        scores = probe_scores(bb, ds, names, sigmas=_sigmas(sigmas), n=n, batch_size=batch_size, rank=r, world_size=w)
        if w > 1:
            scores = gather_scores(scores, json_out, r, w)
            if scores is None:
                out.print(f"worker {r} of {w}: its images are scored; worker 0 merges them into {json_out}",
                          highlight=False, soft_wrap=True)
                return
        res = scores.result()
    best_t = res["miou"].max(2)  # (L, T): best threshold per cell
    t = Table(title=f"zero-shot segmentation mIoU (best background threshold), {res['samples']} samples")
    t.add_column("block")
    for s in res["sigmas"]:
        t.add_column(f"σ {s:g}", justify="right")
    for li, layer in enumerate(res["layers"]):
        t.add_row(f"{layer} ({describe_layer(bb, layer)})", *[f"{v:.1f}" for v in best_t[li]])
    out.print(t)
    b = res["best"]
    out.print(f"expert layer: block {b['layer']} ({describe_layer(bb, b['layer'])}) at σ {b['sigma']:g}, "
              f"threshold {b['threshold']:g}: {b['miou']:.1f} mIoU — use `generate --tasks openseg "
              f"--openseg-layer {b['layer']} --openseg-sigma {b['sigma']:g} --openseg-threshold {b['threshold']:g}`",
              highlight=False, soft_wrap=True)
    if json_out is not None:
        json_out.write_text(json.dumps({**res, "miou": res["miou"].tolist(), "classes": names}, indent=1))


def finetune_grounding(
    data: Annotated[str, typer.Option(help="Images with segmentation labels and class names (voc:PATH, folder:PATH, "
                                           "a files-layout folder…).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder of the LoRA (pytorch_lora_weights.safetensors, "
                                                        "grounding.json); re-run to resume.")],
    model: Model = "toy",
    split: Annotated[str | None, typer.Option(help="Dataset split.")] = None,
    size: Annotated[int | None, typer.Option(help="Resize + center-crop to SIZE×SIZE.")] = None,
    captions: Annotated[Path | None, typer.Option(help="JSONL of {\"key\", \"caption\"} lines [each image's class "
                                                       "names].")] = None,
    classes: Annotated[str | None, typer.Option(help="Comma-separated class names, background first "
                                                     "[the dataset's classes].")] = None,
    layer: Annotated[int | None, typer.Option(help="The grounding expert block [the backbone's openseg layer, "
                                                   "e.g. from probe-layers].")] = None,
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 1000,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 4,
    lr: Annotated[float, typer.Option(help="AdamW rate of the LoRA weights.")] = 1e-5,
    warmup: Annotated[int, typer.Option(help="Warm-up steps (then cosine).")] = 500,
    rank: Annotated[int, typer.Option(help="LoRA rank (alpha = rank).")] = 16,
    gradient_checkpointing: Annotated[bool, typer.Option(help="Recompute activations in backward: less memory "
                                                              "(FLUX.1-dev at 1024² on one 80 GB GPU).")] = False,
    seed: Annotated[int, typer.Option()] = 0,
    device: Device = "auto",
    dtype: Dtype = "auto",
) -> None:
    """Seg4Diff's mask-alignment fine-tuning: a LoRA on the joint blocks' attention that aligns the expert block's
    image→text attention with the class masks (focal + dice), the flow-matching loss keeping generation intact."""
    dev = resolve_device(device)
    from ..backbones import load_backbone
    from ..io.datasets import open_dataset
    from ..train.grounding import GroundingConfig, finetune_grounding as run

    with clean_errors(usage=(ValueError,)):
        cfg = GroundingConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, rank=rank, alpha=rank,
                              layer=layer, gradient_checkpointing=gradient_checkpointing, seed=seed)
    with clean_errors():
        ds = open_dataset(data, split=split, size=size, captions=captions)
        names = [c.strip() for c in classes.split(",")] if classes else list(ds.classes)
        bb = load_backbone(model, dtype=torch_dtype(dtype, dev), device=dev)
        result = run(bb, ds, names, out_dir, cfg)  # the dataset reads an image when a step draws it
    first, last = result["first"], result["last"]
    out.print(f"LoRA in {result['lora']} (expert block {result['layer']}); first step: "
              + ", ".join(f"{k} {v:.4f}" for k, v in first.items()) + "; last: "
              + ", ".join(f"{k} {v:.4f}" for k, v in last.items())
              + f" — use `generate --lora {out_dir}`", highlight=False, soft_wrap=True)
