"""`extract`, `train`, `eval`: feature caches from labelled images, head training, head scoring."""

from __future__ import annotations

import gc
import json
import math
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..tasks import class_task
from ..tasks import get as get_task
from ._errors import clean_errors, err, fail
from ._options import (DEFAULT_CODEC, Blocks, Codec, Device, Dino, Dtype, HeadsPrecision, Lora, LoraScale, Model,
                       Offload, Storage, check_runtime, output_file, parse_bytes, parse_tasks, read_prompts,
                       resolve_device, torch_dtype, worker)

out = Console()
# Images per real-image forward when train / eval extract for themselves: × 4 sigmas = 16 rows, a modest
# activation load beside FLUX.1-dev's 24 GB of bf16 weights (`extract --batch-size` tunes it).
EXTRACT_BATCH = 4


Data = Annotated[str | None, typer.Option(
    "--data", help="Labelled images: voc:PATH, duts:PATH, nyu:PATH (PNG list root or labelled .mat), folder:PATH, "
                   "or a files-layout folder (e.g. from `toy render`).")]
Split = Annotated[str | None, typer.Option(help="Dataset split (VOC train_aug/train/val, DUTS TR/TE, NYU file list "
                                                "or train/test…; default: the reader's).")]
Size = Annotated[int | None, typer.Option(help="Resize the shorter side, then center-crop to SIZE×SIZE "
                                               "(real datasets mix sizes; 512 for FLUX.1-dev).")]
Captions = Annotated[Path | None, typer.Option(help="JSONL of {\"key\", \"caption\"} lines: the prompt each image "
                                                    "is conditioned on (default: empty).")]


def _load(model: str, dev: str, dtype: str, dino: Path | None, **runtime):
    """The backbone (and DINOv3 when asked for) on `dev`; `runtime`: offload, storage, LoRA."""
    from ..backbones import load_backbone

    bb = load_backbone(model, dtype=torch_dtype(dtype, dev), device=dev, **runtime)
    if dino is None:
        return bb, None
    from ..backbones.dino import DinoFeatures

    return bb, DinoFeatures.load(dino, device=dev, dtype=torch_dtype(dtype, dev))


def _live(sources: list[tuple[str | None, str | None]], *, model: str, device: str, dtype: str, dino: Path | None,
          lora: Path | None, lora_scale: float, env: dict[str, str], **spec) -> list:
    """`train --no-cache`: the backbone (and DINOv3) loaded once on this worker's device, and each (data, split)
    of `sources` as a `LiveFeatures` source (None where data is None); `spec`: tasks, size, captions, cross."""
    from ..train.feature_cache import open_live

    dev, *_ = worker(device, env)
    bb, features = _load(model, dev, dtype, dino, lora=lora, lora_scale=lora_scale)
    return [open_live(bb, src, split=spl, dino=features, extract_batch_size=EXTRACT_BATCH, **spec)
            if src is not None else None for src, spl in sources]


def _extract(data: str, out_dir: Path, *, model: str, device: str, dtype: str, dino: Path | None = None,
             offload: str = "none", storage: str = "full", lora: Path | None = None, lora_scale: float = 1.0,
             env: dict[str, str] | None = None, wait: bool = True, **settings) -> tuple[int, int, int]:
    """Load the backbone (and DINOv3) on this worker's device and extract its shards of a dataset
    (`feature_cache.extract_dataset` with `settings`; rank and world size from `env`); with `wait`, then wait
    for the other workers' shards. Returns (samples, rank, world size)."""
    from ..train.feature_cache import extract_dataset, wait_for_cache

    dev, r, w, source = worker(device, env)
    if w > 1:
        out.print(f"worker {r} of {w} ({source}) on {dev}: extracting shards s ≡ {r} (mod {w}) of {out_dir}",
                  highlight=False, soft_wrap=True)
    bb, features = _load(model, dev, dtype, dino, offload=offload, storage=storage, lora=lora, lora_scale=lora_scale)
    n = extract_dataset(bb, data, out_dir, dino=features, rank=r, world_size=w, **settings)
    del bb, features  # capture's hooks make a cycle (backbone → hooks → transformer): free the weights before training
    gc.collect()
    if wait and w > 1:
        wait_for_cache(out_dir)
    return n, r, w


def extract(
    data: Data,
    out_dir: Annotated[Path, typer.Option("--out", help="Feature-cache folder (resumable).")],
    split: Split = None,
    size: Size = None,
    captions: Captions = None,
    model: Model = "toy",
    tasks: Annotated[str, typer.Option(help="Tasks whose concept sets are captured.")] = "seg,saliency,depth",
    cross_attention: Annotated[bool, typer.Option(help="Also store averaged cross-attention maps.")] = False,
    blocks: Blocks = "feature",
    batch_size: Annotated[int, typer.Option(help="Images per transformer forward (× number of sigmas).")] = 16,
    shard_size: Annotated[int | None, typer.Option(help="At most this many samples per shard [as many as "
                                                        "--max-shard-bytes holds].")] = None,
    max_shard_bytes: Annotated[str, typer.Option(help="Tensor bytes per shard (2G = 2 GiB; K, M, G binary): bounds "
                                                      "the host memory of extraction.")] = "2G",
    seed: Annotated[int, typer.Option(help="Noise seed base; sample i uses seed + i.")] = 0,
    codec: Codec = DEFAULT_CODEC,
    dino: Dino = None,
    lora: Lora = None,
    lora_scale: LoraScale = 1.0,
    device: Device = "auto",
    dtype: Dtype = "auto",
    offload: Offload = "none",
    storage: Storage = "full",
) -> None:
    """Encode labelled images once in real-image mode and store features, concept maps and labels.

    Many GPUs: one process per GPU on the same --out (torchrun, srun); worker r writes shards s ≡ r (mod W)."""
    task_list = [t for t in parse_tasks(tasks) if get_task(t).trained]  # openseg reads no cache
    if data is None:
        fail("--data is required (a dataset: voc:PATH, duts:PATH, nyu:PATH, folder:PATH or a files-layout folder)",
             code=2)
    if min(batch_size, shard_size or 1) < 1:
        fail("--batch-size and --shard-size must be ≥ 1", code=2)
    max_bytes = parse_bytes(max_shard_bytes, "--max-shard-bytes")
    check_runtime(offload, storage, resolve_device(device))
    with clean_errors():
        n, r, w = _extract(data, out_dir, model=model, device=device, dtype=dtype, dino=dino, lora=lora,
                           lora_scale=lora_scale, offload=offload, storage=storage, wait=False, tasks=task_list,
                           split=split, size=size, captions=captions,
                           cross_attention=cross_attention, blocks=blocks, batch_size=batch_size,
                           shard_size=shard_size, max_shard_bytes=max_bytes, seed=seed, codec=codec)
    if w > 1:
        out.print(f"worker {r} of {w}: its shards of the feature cache of {n} samples in {out_dir} are done "
                  "(the cache is complete once every worker is)", highlight=False, soft_wrap=True)
    else:
        out.print(f"feature cache of {n} samples in {out_dir}")


def train(
    ctx: typer.Context,
    task: Annotated[str | None, typer.Option(help="seg, saliency (sal) or depth; several (seg,sal,depth) train one "
                                                  "multi-task head sharing one aggregation.")] = None,
    out_path: Annotated[Path | None, typer.Option("--out", help="Head file to write (.safetensors); with --recipe, "
                                                                "the heads folder.")] = None,
    cache: Annotated[Path | None, typer.Option(help="Training feature cache (filled from --data first when "
                                                    "given).")] = None,
    eval_cache: Annotated[Path | None, typer.Option(help="Validation feature cache, scored at the end "
                                                         "(filled from --eval-data first when given).")] = None,
    data: Data = None,
    split: Split = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Extract --data's (and --eval-data's) features for "
                                                              "each batch inside the training loop instead of "
                                                              "caching them: no scratch disk, one backbone forward "
                                                              "per batch and epoch.")] = False,
    codec: Codec = DEFAULT_CODEC,
    eval_data: Annotated[str | None, typer.Option(help="Validation dataset, as --data.")] = None,
    eval_split: Annotated[str | None, typer.Option(help="Validation split, as --split.")] = None,
    size: Size = None,
    captions: Captions = None,
    model: Model = "toy",
    dino: Dino = None,
    lora: Lora = None,
    lora_scale: LoraScale = 1.0,
    device: Device = "auto",
    dtype: Dtype = "auto",
    epochs: Annotated[int, typer.Option(help="Passes over the cache (≥ 1).")] = 20,
    batch_size: Annotated[int, typer.Option(help="Samples per step, per process (≥ 1).")] = 16,
    lr: Annotated[float, typer.Option(help="AdamW rate of the aggregation modules (> 0).")] = 1e-4,
    side: Annotated[str, typer.Option(help="Side maps: concepts, cross, both or none.")] = "concepts",
    timesteps: Annotated[str | None, typer.Option(help="Sigma indices to use, e.g. 3 (default: all).")] = None,
    fusion: Annotated[str, typer.Option(help="learned (paper) or mean (ablation).")] = "learned",
    decoder_channels: Annotated[int | None, typer.Option(help="Decoder width (default 256).")] = None,
    recipe: Annotated[str | None, typer.Option(help="Run a whole recipe with the paper's settings: voc, duts, nyu "
                                                    "or toy (caption → extract → train → eval → card, each stage "
                                                    "resumable; its cost printed first). Options given explicitly "
                                                    "override the recipe's.")] = None,
    work: Annotated[Path | None, typer.Option(help="With --recipe: the folder of its captions and feature caches "
                                                   "(re-run the command to resume).")] = None,
    captioner: Annotated[str | None, typer.Option(help="With --recipe: the captioning model, as `caption --model` "
                                                        "takes it, or none [the recipe's: google/gemma-3-4b-it; toy: "
                                                        "oracle].")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="With --recipe: print what the run will cost (images, "
                                                            "GPU time, scratch disk) and exit.")] = False,
) -> None:
    """Train one head on a feature cache, or on --data directly with --no-cache (resumable): one task, or several
    sharing one aggregation. With --recipe: caption, extract, train, score and card in one command.

    Many GPUs: one process group, a process per GPU (torchrun or accelerate launch); --data is extracted shard by
    shard across them, then every process trains on its share of each batch, all for the same number of steps."""
    if recipe is not None:
        from .recipe import train_recipe

        return train_recipe(ctx)
    misplaced = [o for o, v in (("--work", work), ("--captioner", captioner), ("--dry-run", dry_run)) if v]
    if misplaced:
        fail(f"{misplaced[0]} goes with --recipe", code=2)
    if task is None or out_path is None:
        fail("--task and --out are required (the head's tasks and its file), or --recipe", code=2)
    picked = parse_tasks(task, option="--task")
    zero_shot = [t for t in picked if not get_task(t).trained]
    if zero_shot:
        raise typer.BadParameter(f"{zero_shot[0]} is zero-shot: it has no head to train (see probe-layers)",
                                 param_hint="'--task'")
    name = "+".join(picked)
    if epochs < 1 or batch_size < 1:
        fail("--epochs and --batch-size must be ≥ 1", code=2)
    if not (math.isfinite(lr) and lr > 0):
        fail(f"--lr must be a finite number > 0, got {lr:g}", code=2)
    if out_path.is_dir():
        fail(f"--out {out_path} is a folder; give the head file to write (e.g. {out_path / (name + '.safetensors')})",
             code=2)
    steps = _indices(timesteps, "--timesteps")
    head = (("decoder_channels", decoder_channels),) if decoder_channels else ()
    if no_cache:
        if data is None or cache is not None or eval_cache is not None:
            fail("--no-cache trains on --data (and scores on --eval-data) without --cache or --eval-cache", code=2)
    elif cache is None:
        fail("--cache is required (the feature cache to train on), or --data with --no-cache", code=2)
    elif eval_data is not None and eval_cache is None:
        fail("--eval-data needs --eval-cache (the folder its features go to), or --no-cache", code=2)
    from ..heads.inputs import SIDES, reads_cross
    from ..train.feature_cache import FeatureCache
    from ..train.trainer import TrainConfig, train_head

    if side not in SIDES:
        raise typer.BadParameter(f"choose from {', '.join(SIDES)}, got {side!r}", param_hint="'--side'")

    group = group_env()
    what = dict(tasks=list(picked), size=size, captions=captions, cross_attention=reads_cross(side))
    with clean_errors():
        if no_cache:
            tr, ev = _live([(data, split), (eval_data, eval_split)], model=model, device=device, dtype=dtype,
                           dino=dino, lora=lora, lora_scale=lora_scale, env=group, **what)
        else:
            # Datasets are extracted first (resumable), with the side maps this head reads.
            for src, spl, folder in ((data, split, cache), (eval_data, eval_split, eval_cache)):
                if src is not None:  # a finished cache of the same inputs is kept; another one is refused
                    _extract(src, folder, model=model, device=device, dtype=dtype, dino=dino, lora=lora,
                             lora_scale=lora_scale, env=group, split=spl, batch_size=EXTRACT_BATCH, codec=codec,
                             **what)
            tr = FeatureCache(cache)
            ev = FeatureCache(eval_cache) if eval_cache else None
        cfg = TrainConfig(tasks=picked, epochs=epochs, batch_size=batch_size, lr=lr, side=side, timesteps=steps,
                          fusion=fusion, head=head, dino=dino is not None)
        classes = tr.manifest.get("classes") or []
        if class_task(picked) and not classes:
            fail(f"{tr.root} records no class names: give it a dataset with classes.txt")
        metrics = train_head(tr, cfg, out_path, classes=classes, palette=tr.manifest.get("palette"), eval_cache=ev,
                             depth_unit="metre" if any(get_task(t).kind == "positive" for t in picked) else "")
    _print_metrics(metrics if len(picked) > 1 else {name: metrics})
    _refresh_card(out_path.parent)


def distill(
    prompts: Annotated[Path, typer.Option(help="Text file, one prompt per line (as `generate` reads it).")],
    task: Annotated[str, typer.Option(help="The task(s) the teacher labels: seg or depth for a transformers "
                                           "teacher; any of seg,saliency,depth for the toy's oracle.")],
    teacher: Annotated[str, typer.Option(help="A transformers semantic-segmentation or depth-estimation model "
                                              "(local folder or Hub id in the local HF cache, e.g. "
                                              "depth-anything/Depth-Anything-V2-Base-hf), or `oracle` (the toy "
                                              "world's pixel model).")],
    out_path: Annotated[Path, typer.Option("--out", help="Head file to write (.safetensors).")],
    model: Model = "toy",
    images_per_prompt: Annotated[int, typer.Option("--images-per-prompt", "-n", help="Samples per prompt.")] = 1,
    seed: Annotated[int, typer.Option(help="Global seed, as `generate`'s.")] = 0,
    steps: Annotated[int | None, typer.Option(help="Sampler steps [backbone's recommendation].")] = None,
    guidance: Annotated[float | None, typer.Option(help="FLUX distilled guidance [recommendation].")] = None,
    true_cfg: Annotated[float | None, typer.Option(help="True CFG scale, 1 = off [recommendation].")] = None,
    size: Annotated[int | None, typer.Option(help="Image side in pixels [recommendation].")] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the planned samples (each regenerates them).")] = 1,
    batch_size: Annotated[int, typer.Option(help="Generated images per training step, per process.")] = 8,
    lr: Annotated[float, typer.Option(help="AdamW rate of the aggregation modules (> 0).")] = 1e-4,
    save_every: Annotated[int, typer.Option(help="Steps between resumable checkpoints (and each epoch's end).")] = 50,
    decoder_channels: Annotated[int | None, typer.Option(help="Decoder width (default 256).")] = None,
    eval_data: Annotated[str | None, typer.Option(help="A labelled dataset to score the head on (as --data).")] = None,
    eval_split: Annotated[str | None, typer.Option(help="Its split.")] = None,
    eval_cache: Annotated[Path | None, typer.Option(help="Or a feature cache to score it on.")] = None,
    lora: Lora = None,
    lora_scale: LoraScale = 1.0,
    device: Device = "auto",
    dtype: Dtype = "auto",
) -> None:
    """Train a head with no labelled dataset: each batch is generated with capture, a teacher labels the images,
    and the features and labels make a training step; nothing is stored (resumable).

    Many GPUs: one process group (torchrun, accelerate launch); each process generates its share of every batch."""
    from ..jobs.dataset_job import SettingsError, check_sampling

    picked = parse_tasks(task, option="--task")
    prompt_list = read_prompts(prompts)
    if min(epochs, batch_size, images_per_prompt, save_every) < 1:
        fail("--epochs, --batch-size, --images-per-prompt and --save-every must be ≥ 1", code=2)
    if not (math.isfinite(lr) and lr > 0):
        fail(f"--lr must be a finite number > 0, got {lr:g}", code=2)
    if teacher != "oracle" and len(picked) > 1:
        fail("a transformers teacher labels one task: give one --task (seg or depth)", code=2)
    if eval_data is not None and eval_cache is not None:
        fail("--eval-data and --eval-cache exclude each other", code=2)
    if out_path.is_dir():
        fail(f"--out {out_path} is a folder; give the head file to write", code=2)
    with clean_errors(usage=(ValueError,)):
        check_sampling(num_inference_steps=steps, guidance_scale=guidance, true_cfg_scale=true_cfg, height=size)
    from ..jobs.distill import distill as run
    from ..train.feature_cache import FeatureCache, open_live
    from ..train.trainer import TrainConfig

    group = group_env()
    head = (("decoder_channels", decoder_channels),) if decoder_channels else ()
    with clean_errors(usage=(SettingsError,)):  # an image size the backbone cannot take is a usage error
        cfg = TrainConfig(tasks=picked, epochs=epochs, batch_size=batch_size, lr=lr, head=head)
        dev, *_ = worker(device, group)
        bb, _ = _load(model, dev, dtype, None, lora=lora, lora_scale=lora_scale)
        if teacher == "oracle":
            from ..toy.oracle import OracleTeacher

            labeller = OracleTeacher()
        else:
            from ..backbones.teacher import Teacher

            labeller = Teacher.load(teacher, picked[0], device=dev, dtype=torch_dtype(dtype, dev))
        ev = FeatureCache(eval_cache) if eval_cache else None
        if eval_data is not None:
            ev = open_live(bb, eval_data, list(picked), split=eval_split, size=size, extract_batch_size=EXTRACT_BATCH)
        sampling = {"num_inference_steps": steps, "guidance_scale": guidance, "true_cfg_scale": true_cfg,
                    "height": size, "width": size}
        metrics = run(bb, prompt_list, labeller, cfg, out_path, images_per_prompt=images_per_prompt, seed=seed,
                      sampling=sampling, eval_source=ev, save_every=save_every)
    _refresh_card(out_path.parent)
    _print_metrics(metrics if len(picked) > 1 else {"+".join(picked): metrics})


def evaluate(
    head: Annotated[Path, typer.Option(help="Head file (.safetensors), or a heads folder or Hub repo id org/name "
                                            "holding one (org/name/FILE.safetensors picks one).")],
    cache: Annotated[Path, typer.Option(help="Feature cache to score on (filled from --data first when given).")],
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the metrics here.")] = None,
    data: Data = None,
    split: Split = None,
    size: Size = None,
    captions: Captions = None,
    model: Model = "toy",
    dino: Dino = None,
    lora: Lora = None,
    lora_scale: LoraScale = 1.0,
    precision: HeadsPrecision = "fp32",
    device: Device = "auto",
    dtype: Dtype = "auto",
) -> None:
    """Score a head on a feature cache (or on a dataset, extracted first): prints a table, optionally writes JSON."""
    if json_out is not None:  # before minutes of evaluation
        output_file(json_out, "--json")
    from ..heads.checkpoint import load_head, read_meta
    from ..train.evaluate import evaluate_head
    from ..train.feature_cache import FeatureCache, head_spec

    with clean_errors():
        head = _one_head(head)
        if data is not None:
            m = read_meta(head)
            _extract(data, cache, model=model, device=device, dtype=dtype, dino=dino, lora=lora,
                     lora_scale=lora_scale, env={},  # one process scores
                     tasks=list(m.config.tasks), split=split, size=size, captions=captions,
                     spec=head_spec(m), batch_size=EXTRACT_BATCH)  # exactly what this head reads
        fc = FeatureCache(cache)
        model, meta = load_head(head, backbone=fc.manifest["backbone"])
        meta.check_inputs(fc.spec, fc.layers, f"the cache {cache}")
        cached = fc.manifest.get("dino", {})
        if meta.dino and (cached.get("config_sha256"), cached.get("layers")) != (meta.dino["config_sha256"],
                                                                                meta.dino["layers"]):
            fail(f"the head reads DINOv3 maps of {meta.dino['name']!r}; {cache} has "
                 + (f"those of {cached['name']!r}" if cached else "none (extract it with --dino PATH)"), code=2)
        steps = meta.timestep_indices(list(fc.spec.sigmas))
        by_task = evaluate_head(model, meta.side, steps, fc, meta.classes, precision=precision)
    _print_metrics(by_task)
    if json_out is not None:  # a one-task head's metrics as they are; a multi-task head's by task
        json_out.write_text(json.dumps(by_task if len(by_task) > 1 else next(iter(by_task.values())), indent=1))


def group_env() -> dict[str, str]:
    """The environment that names this process's rank in its process group (torchrun, accelerate launch). Training
    ranks are the group's: SLURM task and job-array ids do not split the extraction, so array tasks training
    different heads each extract their whole data."""
    return {k: v for k, v in os.environ.items() if k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "CUDA_VISIBLE_DEVICES")}


def _one_head(source: Path) -> Path:
    """--head: a head file, or a heads folder or Hub repo (`resolve_heads`) that holds exactly one."""
    from ..heads.checkpoint import head_paths
    from ..jobs.annotate import resolve_heads

    path = resolve_heads(source)
    files = head_paths(path) if path.is_dir() else [path]
    if len(files) != 1:
        fail(f"{source} holds {len(files)} head files ({', '.join(f.name for f in files) or 'none'}): pick one, "
             f"e.g. --head {source}/{files[0].name if files else 'seg.safetensors'}", code=2)
    return files[0]


def _refresh_card(folder: Path) -> None:
    """After `train` wrote a head: the folder's config.json and model card, covering all its heads (the main
    process writes heads and cards). A folder that cannot be a heads repo (someone else's README.md, heads of
    another backbone) keeps the head with a warning: the training succeeded."""
    from accelerate import PartialState

    from ..heads.card import write_card

    if PartialState().is_main_process:
        try:
            write_card(folder)
        except ValueError as e:
            err.print(f"[yellow]warning:[/] no model card written: {escape(str(e))}", highlight=False, soft_wrap=True)


def _indices(text: str | None, option: str) -> tuple[int, ...] | None:
    """"0,3" → (0, 3); None or "" → None; anything else is a usage error naming `option`."""
    if not text:
        return None
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"comma-separated integers expected, got {text!r}", param_hint=f"'{option}'") from None


def _print_metrics(by_task: dict) -> None:
    """One table per task of {task: metrics} (the training run's record and the non-main ranks' {} skipped)."""
    for task, metrics in by_task.items():
        if task == "train" or not metrics:
            continue
        t = Table(title=f"{task} metrics")
        t.add_column("metric")
        t.add_column("value", justify="right")
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                t.add_row(k, f"{v:.4f}")
        out.print(t)


# `mmdiff-gen heads …`: a heads folder as a Hub model repo.
app = typer.Typer(help="Heads folders as Hub model repos.", no_args_is_help=True, rich_markup_mode=None)


@app.command()
def card(
    folder: Annotated[Path, typer.Argument(help="Heads folder (its *.safetensors head files).")],
    license_id: Annotated[str | None, typer.Option("--license", help="Licence id of the card (e.g. apache-2.0) [the "
                                                                     "folder's recorded one, else other: the "
                                                                     "backbone's terms].")] = None,
) -> None:
    """Write (or refresh) FOLDER's config.json and README.md model card from its head files: the folder is then a
    Hub model repo (`hf upload ORG/NAME FOLDER`) that `generate --heads ORG/NAME` reads."""
    from ..heads.card import write_card

    if not folder.is_dir():
        fail(f"{folder} is not a heads folder", code=2)
    with clean_errors(usage=(ValueError,)):
        paths = write_card(folder, license_id)
    out.print(f"wrote {' and '.join(str(p) for p in paths)}", highlight=False, soft_wrap=True)
