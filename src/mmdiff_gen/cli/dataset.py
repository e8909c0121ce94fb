"""`generate`, `export`, `preview`: the dataset job, its COCO export and a contact sheet."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ._errors import clean_errors, err, fail
from ._options import Device, Dino, Dtype, Model, parse_tasks, read_prompts, resolve_device, torch_dtype

out = Console(stderr=True)


def generate(
    prompts: Annotated[Path, typer.Option(help="Text file, one prompt per line (blank lines are skipped).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Dataset folder (re-run the same command to resume).")],
    tasks: Annotated[str, typer.Option(help="Any of seg, saliency (sal), depth, openseg (zero-shot, no head), "
                                            "comma-separated.")] = "seg,saliency,depth",
    model: Model = "toy",
    heads: Annotated[Path | None, typer.Option(help="Heads folder (seg/saliency/depth.safetensors) or one head file "
                                                     "[the backbone's shipped heads].")] = None,
    images_per_prompt: Annotated[int, typer.Option("--images-per-prompt", "-n", help="Samples per prompt.")] = 1,
    seed: Annotated[int, typer.Option(help="Global seed; each sample's seed derives from (seed, prompt, repeat).")] = 0,
    steps: Annotated[int | None, typer.Option(help="Sampler steps [backbone's recommendation, else 28].")] = None,
    guidance: Annotated[float | None, typer.Option(help="FLUX distilled guidance [recommendation, else 3.5].")] = None,
    true_cfg: Annotated[float | None, typer.Option(help="True CFG scale, 1 = off [recommendation, else 1].")] = None,
    size: Annotated[int | None, typer.Option(help="Image side in pixels [recommendation, else 512].")] = None,
    batch_size: Annotated[int, typer.Option(help="Prompts per generation pass.")] = 4,
    image_format: Annotated[str, typer.Option(help="jpg or png.")] = "jpg",
    fmt: Annotated[str, typer.Option("--format", help="webdataset (tar shards) or files (folders).")] = "webdataset",
    shard_size: Annotated[int, typer.Option(help="Samples per shard.")] = 1000,
    rank: Annotated[int | None, typer.Option(help="This worker's rank [RANK, SLURM_PROCID, …, else 0].")] = None,
    world_size: Annotated[int | None, typer.Option(help="Number of workers [WORLD_SIZE, SLURM_NTASKS, …, else 1].")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a dataset made from other inputs.")] = False,
    retry_failed: Annotated[bool, typer.Option(help="Also redo finished shards that recorded failed samples.")] = False,
    dino: Dino = None,
    classes: Annotated[str | None, typer.Option(help="openseg: class names, background first, comma-separated "
                                                     "[the seg head's classes].")] = None,
    openseg_layer: Annotated[int | None, typer.Option(help="openseg: attention block [mmdiff.json, else the "
                                                           "family's default; see probe-layers].")] = None,
    openseg_sigma: Annotated[float | None, typer.Option(help="openseg: sigma whose attention is read [0.52].")] = None,
    openseg_threshold: Annotated[float | None, typer.Option(help="openseg: background threshold [0.5].")] = None,
    min_quality: Annotated[float | None, typer.Option(help="Drop samples whose quality score is below this "
                                                           "(0–1; recorded as filtered in the shard stats).")] = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
) -> None:
    """Generate images with their segmentation, saliency and depth in one pass per batch, as shards."""
    from ..backbones.loading import DEFAULT_HEADS
    from ..jobs.plan import local_device, worker_identity

    task_list = parse_tasks(tasks)
    texts = read_prompts(prompts)
    if min(images_per_prompt, batch_size, shard_size, steps or 1, size or 1) < 1:
        fail("--images-per-prompt, --batch-size, --shard-size, --steps and --size must be ≥ 1", code=2)
    if seed < 0:
        fail("--seed must be ≥ 0", code=2)
    if image_format not in ("jpg", "png"):
        fail(f"--image-format must be jpg or png, got {image_format!r}", code=2)
    if fmt not in ("webdataset", "files"):
        fail(f"--format must be webdataset or files, got {fmt!r}", code=2)
    dev = local_device(resolve_device(device))
    torch_dt = torch_dtype(dtype, dev)
    from ..heads.checkpoint import HeadMismatch
    from ..jobs.dataset_job import FingerprintMismatch, Interrupted

    try:  # before loading a backbone (minutes for FLUX): can we write there at all?
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"cannot create output folder {out_dir}: {e.strerror or type(e).__name__}", code=2)
    with clean_errors(usage=(HeadMismatch, FingerprintMismatch)):
        r, w, source = worker_identity(rank, world_size)
        from ..backbones import load_backbone
        from ..jobs.annotate import Annotator, head_files
        from ..jobs.dataset_job import GenerateJob, overlong_prompts, run_generate

        trained = [t for t in task_list if t != "openseg"]
        heads = heads if heads is not None else DEFAULT_HEADS.get(model)
        if trained and heads is None:
            fail(f"no default heads for {model!r}: pass --heads (a folder of seg/saliency/depth.safetensors)", code=2)
        files = head_files(heads, trained) if trained else {}  # before loading the backbone: fail fast
        names = None
        if "openseg" in task_list:
            from ..heads.checkpoint import read_meta

            names = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
            seg_head = files.get("seg") or (Path(heads) / "seg.safetensors" if heads is not None else None)
            if names is None and seg_head is not None and Path(seg_head).is_file():
                names = read_meta(seg_head).classes  # the seg head's classes
            if not names:
                fail("openseg needs class names: pass --classes background,cat,dog,…", code=2)
        if min_quality is not None and not {"seg", "saliency", "openseg"} & set(task_list):
            fail("--min-quality needs a task with a quality signal: seg, saliency or openseg", code=2)
        bb = load_backbone(model, dtype=torch_dt, device=dev)
        dino_features = None
        if dino is not None:
            from ..backbones.dino import DinoFeatures

            dino_features = DinoFeatures.load(dino, device=dev, dtype=torch_dt)
        openseg = None
        if names:
            from ..heads.openseg import OpenSegConfig

            g = bb.default_grounding()
            openseg = OpenSegConfig(classes=tuple(names), layer=g["layer"] if openseg_layer is None else openseg_layer,
                                    sigma=g["sigma"] if openseg_sigma is None else openseg_sigma,
                                    threshold=g["threshold"] if openseg_threshold is None else openseg_threshold)
        annotator = Annotator(files, bb.identity(), device=dev, dino=dino_features, openseg=openseg,
                              token_positions=bb.class_token_positions)
        kw = bb.sampling_kwargs(height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
                                true_cfg_scale=true_cfg)
        job = GenerateJob(out=out_dir, tasks=task_list, images_per_prompt=images_per_prompt, seed=seed,
                          batch_size=batch_size, image_format=image_format, format=fmt, shard_size=shard_size,
                          overwrite=overwrite, retry_failed=retry_failed, min_quality=min_quality, **kw)
        long = overlong_prompts(bb, texts, job.max_sequence_length)
        if long:
            i, n = long[0]
            err.print(f"[yellow]warning:[/] {len(long)} prompt(s) exceed {job.max_sequence_length} text tokens and will be truncated "
                      f"(first: prompt {i + 1}, {n} tokens)", highlight=False, soft_wrap=True)
        if w > 1:
            out.print(f"worker {r} of {w} ({source}) on {dev}", highlight=False, soft_wrap=True)
        try:
            rep = run_generate(bb, annotator, texts, job, rank=r, world_size=w, dtype=str(torch_dt).removeprefix("torch."))
        except Interrupted as e:
            err.print(f"[bold red]interrupted[/] by {e}: the open shard was discarded, finished shards are kept; "
                      "re-run the same command to resume", highlight=False, soft_wrap=True)
            raise typer.Exit(128 + e.signum) from None
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in rep.seconds.items())
    out.print(f"{out_dir}: {rep.samples_written} samples written in {rep.shards_written} shard(s), "
              f"{rep.shards_skipped} already finished, {rep.samples_failed} failed"
              + (f", {rep.samples_filtered} below --min-quality" if rep.samples_filtered else "")
              + (f" ({stages})" if stages else ""),
              highlight=False, soft_wrap=True)
    if rep.samples_failed:
        err.print("failed samples are listed in the shards' *_stats.json; --retry-failed redoes them", highlight=False, soft_wrap=True)
        if not rep.samples_written:
            raise typer.Exit(1)  # nothing worked: a batch job must see it


def export(
    src: Annotated[Path, typer.Option("--in", help="A `generate` output folder.")],
    dest: Annotated[Path, typer.Option("--out", help="Export folder.")],
    fmt: Annotated[str, typer.Option("--format", help="coco.")] = "coco",
    include_background: Annotated[bool, typer.Option(help="Annotate class 0 too.")] = False,
    min_quality: Annotated[float | None, typer.Option(help="Export only samples whose quality score is at "
                                                           "least this.")] = None,
) -> None:
    """Export a generated dataset: COCO annotations.json (compressed RLE) + images, labels, saliency, depth."""
    from ..io.coco import export_coco

    if fmt != "coco":
        fail(f"unknown export format {fmt!r}; supported: coco", code=2)
    with clean_errors():
        counts = export_coco(src, dest, include_background=include_background, min_quality=min_quality)
    out.print(f"{dest}: {counts['images']} images, {counts['annotations']} annotations, "
              f"{counts['categories']} categories (annotations.json)", highlight=False, soft_wrap=True)


def preview(
    src: Annotated[Path, typer.Argument(help="A `generate` output folder.")],
    sheet: Annotated[Path, typer.Option("--out", help="PNG to write.")] = Path("preview.png"),
    n: Annotated[int, typer.Option("--n", "-n", help="Samples (rows).")] = 16,
) -> None:
    """A contact sheet: image | segmentation overlay | saliency | depth colormap | openseg overlay per sample."""
    from ..io.preview import contact_sheet

    if n < 1:
        fail("--n must be ≥ 1", code=2)
    with clean_errors():
        rows = contact_sheet(src, sheet, n=n)
    out.print(f"{sheet}: {rows} samples", highlight=False, soft_wrap=True)

