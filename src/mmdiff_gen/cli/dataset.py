"""`generate`, `export`, `preview`: the dataset job, its COCO export and a contact sheet."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ._errors import clean_errors, err, fail
from ._options import (Compile, Device, Dino, Dtype, HeadsPrecision, Lora, LoraScale, Model, Offload, Storage,
                       check_compile, check_runtime, parse_tasks, read_prompts, resolve_device)

out = Console(stderr=True)
AllowPartial = Annotated[bool, typer.Option(help="Read the whole shards of an unfinished or damaged dataset "
                                                 "(says what is missing) instead of refusing it.")]


def generate(
    prompts: Annotated[Path, typer.Option(help="Text file, one prompt per line (blank lines and lines starting "
                                               "with # are skipped).")],
    out_dir: Annotated[str, typer.Option("--out", help="Dataset folder, or a URL: s3://bucket/prefix, gs://…, "
                                              "file://… (credentials from the environment / profiles). Re-run "
                                              "the same command to resume.")],
    tasks: Annotated[str, typer.Option(help="Any of seg, saliency (sal), depth, openseg (zero-shot, no head), "
                                            "comma-separated.")] = "seg,saliency,depth",
    model: Model = "toy",
    heads: Annotated[str | None, typer.Option(help="Heads folder (seg/saliency/depth.safetensors), one head file, "
                                                    "or a Hub repo id org/name (local HF cache, else downloaded) "
                                                    "[the backbone's shipped heads].")] = None,
    images_per_prompt: Annotated[int, typer.Option("--images-per-prompt", "-n", help="Samples per prompt.")] = 1,
    seed: Annotated[int, typer.Option(help="Global seed; each sample's seed derives from (seed, prompt, repeat).")] = 0,
    steps: Annotated[int | None, typer.Option(help="Sampler steps [backbone's recommendation, else 28].")] = None,
    guidance: Annotated[float | None, typer.Option(help="FLUX distilled guidance [recommendation, else 3.5].")] = None,
    true_cfg: Annotated[float | None, typer.Option(help="True CFG scale, 1 = off [recommendation, else 1].")] = None,
    size: Annotated[int | None, typer.Option(help="Image side in pixels [recommendation, else 512].")] = None,
    frames: Annotated[int | None, typer.Option(help="A video backbone's frames per clip, 4k + 1 for Wan (clips are "
                                                    "written as KEY.mp4 with per-frame labels) [its default].")] = None,
    batch_size: Annotated[int, typer.Option(help="Prompts per generation pass.")] = 4,
    image_format: Annotated[str, typer.Option(help="jpg or png.")] = "jpg",
    fmt: Annotated[str, typer.Option("--format", help="webdataset (tar shards) or files (folders).")] = "webdataset",
    shard_size: Annotated[int | None, typer.Option(help="Samples per shard [≈ 5 GPU-minutes of FLUX.1-dev at this "
                                                        "size: 256 at 512², 64 at 1024², at most 1000].")] = None,
    write_workers: Annotated[int | None, typer.Option(help="Threads that encode and write a batch while the next "
                                                           "one generates, 0: in between batches [2 on a GPU, 0 on "
                                                           "a CPU].")] = None,
    rank: Annotated[int | None, typer.Option(help="This worker's rank [RANK, SLURM_PROCID, …, else 0].")] = None,
    world_size: Annotated[int | None, typer.Option(help="Number of workers [WORLD_SIZE, SLURM_NTASKS, …, else 1].")] = None,
    engine: Annotated[str, typer.Option(help="local (this process; torchrun / SLURM start one per GPU) or ray "
                                             "(Ray schedules shards onto workers that load the model once).")] = "local",
    ray_address: Annotated[str | None, typer.Option(help="--engine ray: the cluster to join [RAY_ADDRESS, the "
                                                         "running cluster, else a local one].")] = None,
    workers: Annotated[int | None, typer.Option(help="--engine ray: workers to start, one GPU each (CPU workers "
                                                     "with --device cpu); more than fit wait for nodes to join "
                                                     "[the cluster's GPUs, or CPUs, now].")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a dataset made from other inputs.")] = False,
    retry_failed: Annotated[bool, typer.Option(help="Also redo finished shards that recorded failed samples.")] = False,
    dino: Dino = None,
    lora: Lora = None,
    lora_scale: LoraScale = 1.0,
    classes: Annotated[str | None, typer.Option(help="openseg: class names, background first, comma-separated "
                                                     "[the seg head's classes].")] = None,
    openseg_layer: Annotated[int | None, typer.Option(help="openseg: attention block [mmdiff.json, else the "
                                                           "family's default; see probe-layers].")] = None,
    openseg_sigma: Annotated[float | None, typer.Option(help="openseg: sigma whose attention is read [0.52].")] = None,
    openseg_threshold: Annotated[float | None, typer.Option(help="openseg: background threshold [0.5].")] = None,
    min_quality: Annotated[float | None, typer.Option(help="Drop samples whose quality score is below this "
                                                           "(0–1; recorded as filtered in the shard stats).")] = None,
    compile: Compile = "off",
    precision: HeadsPrecision = "auto",
    device: Device = "auto",
    dtype: Dtype = "auto",
    offload: Offload = "none",
    storage: Storage = "full",
) -> None:
    """Generate images with their segmentation, saliency and depth in one pass per batch, as shards."""
    task_list = parse_tasks(tasks)
    check_compile(compile, offload)
    texts = read_prompts(prompts)
    if write_workers is not None and write_workers < 0:
        fail(f"--write-workers must be ≥ 0, got {write_workers}", code=2)
    for option, value in (("--images-per-prompt", images_per_prompt), ("--batch-size", batch_size),
                          ("--shard-size", shard_size), ("--steps", steps), ("--size", size), ("--workers", workers)):
        if value is not None and value < 1:
            fail(f"{option} must be ≥ 1, got {value}", code=2)
    if seed < 0:
        fail("--seed must be ≥ 0", code=2)
    if image_format not in ("jpg", "png"):
        fail(f"--image-format must be jpg or png, got {image_format!r}", code=2)
    if fmt not in ("webdataset", "files"):
        fail(f"--format must be webdataset or files, got {fmt!r}", code=2)
    if engine not in ("local", "ray"):
        fail(f"--engine must be local or ray, got {engine!r}", code=2)
    if engine == "ray" and (rank is not None or world_size is not None):
        fail("--engine ray schedules every shard itself: drop --rank / --world-size", code=2)
    if engine == "local":  # a Ray driver may have no GPU: its workers check their own devices
        check_runtime(offload, storage, resolve_device(device))
    from ..jobs.dataset_job import GenerateJob, Interrupted
    from ..jobs.generator import GenerateConfig, generate_dataset

    # Settings (and the output location) are checked before the backbone loads (minutes for FLUX).
    with clean_errors():
        with clean_errors(usage=(ValueError,)):
            job = GenerateJob(out=out_dir, tasks=task_list, images_per_prompt=images_per_prompt, seed=seed,
                              batch_size=batch_size, image_format=image_format, format=fmt, shard_size=shard_size,
                              height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
                              true_cfg_scale=true_cfg, num_frames=frames, overwrite=overwrite,
                              retry_failed=retry_failed,
                              min_quality=min_quality, write_workers=write_workers)
            config = GenerateConfig(
                prompts=texts, job=job, model=model, heads=heads, lora=lora, lora_scale=lora_scale, dino=dino,
                classes=tuple(c.strip() for c in classes.split(",") if c.strip()) if classes else None,
                openseg_layer=openseg_layer, openseg_sigma=openseg_sigma, openseg_threshold=openseg_threshold,
                compile=compile, precision=precision, device=device, dtype=dtype, offload=offload, storage=storage,
                engine=engine, rank=rank, world_size=world_size, ray_address=ray_address, workers=workers)
            config.check()
        try:
            rep = generate_dataset(config, say=lambda line: err.print(line, highlight=False, soft_wrap=True,
                                                                      markup=False))
        except Interrupted as e:
            err.print(f"[bold red]interrupted[/] by {e}: the open shard was discarded, finished shards are kept; "
                      "re-run the same command to resume", highlight=False, soft_wrap=True)
            raise typer.Exit(128 + e.signum) from None
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in rep.seconds.items())
    if compile != "off":
        from ..capture import compiled_graphs

        stages += f"; torch.compile built {compiled_graphs()} graph(s)"  # armed / unarmed variants, not per step
    out.print(f"{out_dir}: {rep.samples_written} samples written in {rep.shards_written} shard(s), "
              f"{rep.shards_skipped} already finished, {rep.samples_failed} failed"
              + (f", {rep.samples_filtered} below --min-quality" if rep.samples_filtered else "")
              + (f", {rep.shards_damaged} damaged shard(s) redone" if rep.shards_damaged else "")
              + (f", {rep.shards_busy} shard(s) left to another live worker" if rep.shards_busy else "")
              + (f", {rep.shards_taken_over} taken over from other workers" if rep.shards_taken_over else "")
              + (f", {rep.workers_lost} worker(s) lost and their shards redone" if rep.workers_lost else "")
              + (f" ({stages})" if stages else ""),
              highlight=False, soft_wrap=True)
    if rep.samples_failed:
        err.print("failed samples are listed in the shards' *_stats.json; --retry-failed redoes them", highlight=False, soft_wrap=True)
    if rep.shards_failed:
        err.print(f"[bold red]error:[/] every sample of {rep.shards_failed} shard(s) failed; they are not marked done "
                  "and a re-run redoes them", highlight=False, soft_wrap=True)
    if rep.shards_failed or (rep.samples_failed and not rep.samples_written):
        raise typer.Exit(1)  # the dataset is not finished: a batch job must see it


def export(
    src: Annotated[str, typer.Option("--in", help="A `generate` output folder or URL (s3://…, gs://…).")],
    dest: Annotated[Path, typer.Option("--out", help="Export folder.")],
    fmt: Annotated[str, typer.Option("--format", help="coco (images) or youtube-vis (clips: frames and tracked "
                                                      "instances).")] = "coco",
    include_background: Annotated[bool, typer.Option(help="Annotate class 0 too.")] = False,
    min_quality: Annotated[float | None, typer.Option(help="Export only samples whose quality score is at "
                                                           "least this.")] = None,
    min_area: Annotated[int, typer.Option(help="Leave out of annotations.json the object instances (connected "
                                               "components) smaller than this many pixels; labels/ keeps "
                                               "them. 0 keeps all.")] = 0,
    allow_partial: AllowPartial = False,
    mask_format: Annotated[str, typer.Option(help="rle (exact, holes kept: pycocotools, mmdet, detectron2 with "
                                                  "MASK_FORMAT=bitmask) or polygon (for polygon-only loaders; "
                                                  "holes filled).")] = "rle",
    overwrite: Annotated[bool, typer.Option(help="Replace an export folder that holds anything (the new export "
                                                 "takes its place whole).")] = False,
) -> None:
    """Export a generated dataset: COCO annotations.json (one mask per instance) + images, labels, saliency, depth; a
    dataset of clips: YouTube-VIS instances.json (instances tracked over frames) + frames, labels per frame."""
    from ..io.coco import MASK_FORMATS, export_coco
    from ..io.youtube_vis import export_youtube_vis

    if fmt not in ("coco", "youtube-vis"):
        fail(f"unknown export format {fmt!r}; supported: coco, youtube-vis", code=2)
    if mask_format not in MASK_FORMATS:
        fail(f"--mask-format must be one of {', '.join(MASK_FORMATS)}, got {mask_format!r}", code=2)
    if min_area < 0:
        fail(f"--min-area must be ≥ 0 pixels, got {min_area}", code=2)
    from .._atomic import folder_in_use

    if folder_in_use(dest) and not overwrite:
        fail(f"--out {dest} is not empty: choose another folder, or --overwrite to replace it", code=2)
    with clean_errors():
        _say_missing(src, allow_partial)
        if fmt == "youtube-vis":
            counts = export_youtube_vis(src, dest, include_background=include_background, min_quality=min_quality,
                                        min_area=min_area, allow_partial=allow_partial, overwrite=overwrite)
            out.print(f"{dest}: {counts['videos']} videos ({counts['frames']} frames), {counts['annotations']} "
                      f"tracked instances, {counts['categories']} categories (instances.json)", highlight=False,
                      soft_wrap=True)
            return
        counts = export_coco(src, dest, include_background=include_background, min_quality=min_quality,
                             min_area=min_area, allow_partial=allow_partial, mask_format=mask_format,
                             overwrite=overwrite)
    out.print(f"{dest}: {counts['images']} images, {counts['annotations']} annotations, "
              f"{counts['categories']} categories (annotations.json)"
              + (f"; {counts['dropped']} instance(s) under --min-area left out" if counts["dropped"] else ""),
              highlight=False, soft_wrap=True)


def preview(
    src: Annotated[str, typer.Argument(help="A `generate` output folder or URL (s3://…, gs://…).")],
    sheet: Annotated[Path, typer.Option("--out", help="PNG to write.")] = Path("preview.png"),
    n: Annotated[int, typer.Option("--n", "-n", help="Samples (rows).")] = 16,
    allow_partial: AllowPartial = False,
) -> None:
    """A contact sheet: image | segmentation overlay | saliency | depth colormap | openseg overlay per sample (a clip:
    per frame, beside an animated GIF)."""
    from ..io.dataset import read_info
    from ..io.members import VIDEO_FORMAT
    from ..io.preview import contact_sheet

    if n < 1:
        fail("--n must be ≥ 1", code=2)
    with clean_errors():
        _say_missing(src, allow_partial)
        rows = contact_sheet(src, sheet, n=n, allow_partial=allow_partial)
    gif = sheet.with_suffix(".gif")
    clips = f" (clips: their frames, and every frame in {gif})" if read_info(src)["image_format"] == VIDEO_FORMAT else ""
    out.print(f"{sheet}: {rows} samples{clips}", highlight=False, soft_wrap=True)



def _say_missing(src: str, allow_partial: bool) -> None:
    """Under --allow-partial, one warning line naming what an incomplete dataset is missing."""
    if allow_partial:
        from ..io.dataset import check_shards, read_info

        check = check_shards(src, read_info(src))
        if not check.whole:
            err.print(f"[yellow]warning:[/] {src}: {check.problems()}; reading the whole shards only",
                      highlight=False, soft_wrap=True)


def verify(
    src: Annotated[str, typer.Argument(help="A `generate` output folder or URL (s3://…, gs://…).")],
    repair: Annotated[bool, typer.Option(help="Delete the damaged shards and the stray tars and rewrite the indexes, "
                                              "so that re-running the same generate command writes them again.")] = False,
) -> None:
    """Check every shard's files against its done marker (sizes and sha256) and the indexes against the shards:
    lists unfinished, damaged and stray shards and stale indexes; exit 1 unless the dataset is whole."""
    from ..io.dataset import check_shards, index_problems, read_info
    from ..io.dataset import repair as repair_dataset
    from ..io.shards import shard_name

    with clean_errors():
        if repair:
            done = repair_dataset(src)
            check = done["check"]
            removed = done["removed"]
            if removed:
                err.print(f"{src}: removed {len(removed)} damaged or stray shard(s) ({', '.join(removed[:8])}"
                          + (", …" if len(removed) > 8 else "") + "); indexes rewritten", highlight=False, soft_wrap=True)
            todo = len(check.damaged) + len(check.unfinished)
            if todo:
                err.print(f"re-run the same generate command to write the {todo} missing shard(s)", highlight=False,
                          soft_wrap=True)
                raise typer.Exit(1)
            out.print(f"{src}: all {check.num_shards} shard(s) whole; indexes rewritten", highlight=False, soft_wrap=True)
            return
        info = read_info(src)
        check = check_shards(src, info, full=True)
        stale = index_problems(src, info, check)
    samples = sum(st.get("written", 0) for st in check.finished.values())
    if check.whole and not stale:
        out.print(f"{src}: all {check.num_shards} shard(s) whole ({samples} samples; sizes and sha256 match their done "
                  "markers, indexes match the shards)", highlight=False, soft_wrap=True)
        return
    err.print(f"{src}: {len(check.finished)} of {check.num_shards} shards whole ({samples} samples)", highlight=False,
              soft_wrap=True)
    for s, why in sorted(check.damaged.items()):
        err.print(f"damaged     {shard_name(s)}: {why}", highlight=False, soft_wrap=True)
    for s in check.unfinished:
        err.print(f"unfinished  {shard_name(s)}", highlight=False, soft_wrap=True)
    for name in check.stray:
        err.print(f"stray       {name}: not a shard of this dataset", highlight=False, soft_wrap=True)
    for why in stale:
        err.print(f"index       {why}", highlight=False, soft_wrap=True)
    if check.damaged or check.stray:
        err.print(f"mmdiff-gen verify --repair {src} removes the damaged and stray shards and rewrites the indexes; "
                  "then re-run the same generate command to write the missing shards", highlight=False, soft_wrap=True)
    else:
        err.print("re-run the same generate command to write the missing shards and rewrite the indexes",
                  highlight=False, soft_wrap=True)
    raise typer.Exit(1)
