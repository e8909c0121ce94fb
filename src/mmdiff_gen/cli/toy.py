"""`mmdiff-gen toy …`: render the toy world, train the embedded backbone, measure its prompt fidelity."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ._errors import clean_errors, fail
from ._options import output_file

# rich_markup_mode=None: "[~/.cache/…]" in a help text is text, not markup (as on the main app).
app = typer.Typer(help="The embedded toy world and backbone.", no_args_is_help=True, rich_markup_mode=None)
out = Console()


@app.command()
def render(
    n: Annotated[int, typer.Option("--n", help="Number of scenes.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder (files layout).")],
    seed: Annotated[int, typer.Option(help="First scene seed; scenes seed … seed + n − 1.")] = 0,
) -> None:
    """Write N labelled scenes: images/, seg/, saliency/, depth/ (16-bit mm), meta.jsonl."""
    from ..toy.render import write_scenes

    if n < 1:
        fail("--n must be ≥ 1", code=2)
    with clean_errors():
        write_scenes(out_dir, n, seed)
    out.print(f"wrote {n} scenes to {out_dir}")


@app.command()
def train(
    work: Annotated[Path | None, typer.Option(help="Data cache and resumable checkpoints [~/.cache/mmdiff-gen/toy].")] = None,
    phases: Annotated[str, typer.Option(help="Comma-separated: vae, oracle, text, dit, export.")] = "vae,oracle,text,dit,export",
    steps: Annotated[int | None, typer.Option(help="Override every phase's steps (smoke runs).")] = None,
    scenes: Annotated[int | None, typer.Option(help="Override the number of training scenes.")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Pipeline folder (default: the packaged toy).")] = None,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the transformer (faster long runs).")] = False,
    recipe_file: Annotated[Path | None, typer.Option("--recipe", help="JSON of recipe fields over the defaults "
                                                     "(a work folder's recipe.json resumes its run).")] = None,
) -> None:
    """Train the toy backbone and its oracle; re-run the same command to resume."""
    from dataclasses import replace

    from ..toy.recipe import ToyRecipe
    from ..toy.train import DEFAULT_WORK, train_toy

    with clean_errors():
        recipe = ToyRecipe.from_dict(json.loads(recipe_file.read_text()) if recipe_file else {})
        if scenes is not None:
            recipe = replace(recipe, train_scenes=scenes)
        times = train_toy(work or DEFAULT_WORK, recipe, [p.strip() for p in phases.split(",") if p.strip()], steps, out_dir,
                          compile)
    out.print(json.dumps({k: round(v, 1) for k, v in times.items()}))


@app.command("train-video")
def train_video(
    work: Annotated[Path | None, typer.Option(help="Data cache and resumable checkpoints "
                                                   "[~/.cache/mmdiff-gen/toy-video].")] = None,
    phases: Annotated[str, typer.Option(help="Comma-separated: vae, dit, export.")] = "vae,dit,export",
    steps: Annotated[int | None, typer.Option(help="Override every phase's steps (smoke runs).")] = None,
    clips: Annotated[int | None, typer.Option(help="Override the number of training clips.")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Pipeline folder (default: the packaged "
                                                               "toy-video).")] = None,
    recipe_file: Annotated[Path | None, typer.Option("--recipe", help="JSON of recipe fields over the defaults "
                                                     "(a work folder's recipe.json resumes its run).")] = None,
) -> None:
    """Train the toy video backbone (Wan architecture) on the toy video world; re-run the same command to resume."""
    from dataclasses import replace

    from ..toy.train_video import DEFAULT_WORK, train_video_toy
    from ..toy.video_recipe import VideoToyRecipe

    with clean_errors():
        recipe = VideoToyRecipe.from_dict(json.loads(recipe_file.read_text()) if recipe_file else {})
        if clips is not None:
            recipe = replace(recipe, train_clips=clips)
        times = train_video_toy(work or DEFAULT_WORK, recipe, [p.strip() for p in phases.split(",") if p.strip()],
                                steps, out_dir)
    out.print(json.dumps({k: round(v, 1) for k, v in times.items()}))


@app.command("video-heads")
def video_heads(
    model: Annotated[str, typer.Option("--model", "-m", help="A Wan-architecture backbone.")] = "toy-video",
    out_dir: Annotated[Path | None, typer.Option("--out", help="Heads folder (default: the packaged "
                                                               "toy-video heads).")] = None,
    clips: Annotated[int, typer.Option(help="Training clips of the toy video world.")] = 1200,
    held_out: Annotated[int, typer.Option(help="Held-out clips scored at the end.")] = 200,
    steps: Annotated[int, typer.Option(help="Optimiser steps (4 clips each).")] = 800,
    frame_mixing: Annotated[int, typer.Option(help="Kernel (latent frames) of the head's frame mixing, 0: per "
                                                   "frame.")] = 3,
) -> None:
    """Train the toy video backbone's unified seg + saliency + depth head on its real-video features."""
    import torch

    from ..backbones import load_backbone
    from ..toy.video_heads import train_video_heads

    with clean_errors():
        bb = load_backbone(model, dtype=torch.float32, device="cpu")
        metrics = train_video_heads(bb, out_dir, clips=clips, held_out=held_out, steps=steps,
                                    frame_mixing=frame_mixing)
    out.print(json.dumps(metrics))


@app.command("video-eval")
def video_eval(
    model: Annotated[str, typer.Option("--model", "-m")] = "toy-video",
    heads: Annotated[Path | None, typer.Option(help="Heads folder [the backbone's shipped heads].")] = None,
    n: Annotated[int, typer.Option("--n", help="Fresh captions (one clip each).")] = 100,
    batch_size: Annotated[int, typer.Option()] = 10,
    report: Annotated[Path | None, typer.Option(help="Write the figures as JSON here.")] = None,
) -> None:
    """Prompt fidelity, per-frame label quality against the oracle and label flicker (against the per-frame image
    heads) of the toy video backbone."""
    from ..toy.video_eval import run_video_eval

    with clean_errors():
        result = run_video_eval(model, heads, n=n, batch_size=batch_size)
    text = json.dumps(result, indent=1)
    if report is not None:
        report.write_text(text)
    out.print(text)


@app.command("video-probe")
def video_probe(
    model: Annotated[str, typer.Option("--model", "-m")] = "toy-video",
    n: Annotated[int, typer.Option("--n", help="Clips of the toy video world.")] = 64,
    report: Annotated[Path | None, typer.Option(help="Write the table as JSON here.")] = None,
) -> None:
    """MMDiff Fig. 5 on the toy video backbone: every block × sigma as zero-shot segmentation of every frame."""
    from ..toy.video_eval import run_video_probe

    with clean_errors():
        result = run_video_probe(model, n=n)
    text = json.dumps(result, indent=1)
    if report is not None:
        report.write_text(text)
    out.print(text)


@app.command()
def fidelity(
    n: Annotated[int, typer.Option("--n", help="Captions per object count.")] = 200,
    objects: Annotated[str, typer.Option(help="Object counts to test, comma-separated.")] = "1,2",
    model: Annotated[str, typer.Option("--model", "-m")] = "toy",
    batch_size: Annotated[int, typer.Option()] = 50,
    report: Annotated[Path | None, typer.Option(help="Write the figures as JSON here.")] = None,
    sheet: Annotated[Path | None, typer.Option(help="Write a contact sheet of generated images here.")] = None,
) -> None:
    """Prompt fidelity on fresh captions, judged by the oracle, with the judge's ceilings on renders."""
    from ..toy.fidelity_run import run_fidelity

    try:
        counts = [int(x) for x in objects.split(",")]
    except ValueError:
        raise typer.BadParameter(f"comma-separated integers expected, got {objects!r}",
                                 param_hint="'--objects'") from None
    for path, option in ((report, "--report"), (sheet, "--sheet")):
        if path is not None:
            output_file(path, option)
    with clean_errors():
        result = run_fidelity(model, n, counts, batch_size, sheet)
    out.print(json.dumps(result, indent=1))
    if report is not None:
        report.write_text(json.dumps(result, indent=1))


@app.command()
def heads(
    work: Annotated[Path | None, typer.Option(help="Scenes and feature caches [~/.cache/mmdiff-gen/toy-heads].")] = None,
    train_scenes: Annotated[int, typer.Option()] = 2000,
    val_scenes: Annotated[int, typer.Option()] = 500,
    epochs: Annotated[int, typer.Option()] = 6,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Head folder (default: the packaged toy heads).")] = None,
    tasks: Annotated[str, typer.Option(help="Heads to train (more --epochs continues them).")] = "seg,saliency,depth",
) -> None:
    """Train the toy backbone's default seg / saliency / depth heads (resumable; more epochs continue them)."""
    from ..toy.heads_recipe import train_toy_heads
    from ._options import parse_tasks

    with clean_errors():
        metrics = train_toy_heads(work or _HEADS_WORK, train_scenes=train_scenes, val_scenes=val_scenes,
                                  epochs=epochs, out=out_dir, tasks=parse_tasks(tasks))
    out.print(json.dumps(metrics, indent=1))


@app.command()
def ablation(
    work: Annotated[Path | None, typer.Option(help="Scenes and feature caches [~/.cache/mmdiff-gen/toy-ablation].")] = None,
    train_scenes: Annotated[int, typer.Option()] = 1000,
    val_scenes: Annotated[int, typer.Option()] = 500,
    budgets: Annotated[str, typer.Option(help="Epochs at which every head is scored, comma-separated (later "
                                              "budgets continue the earlier runs).")] = "4,12",
    seeds: Annotated[int, typer.Option(help="Seeds per row (mean ± std).")] = 3,
    report: Annotated[Path | None, typer.Option(help="Write the summary as JSON here.")] = None,
) -> None:
    """The paper's Table 5 on the toy world — double-stream t ≈ 0, single-stream t ≈ 0, + cross-attention,
    + concepts, multi-t, mean fusion — with per-class, boundary / interior figures and the mixing weights α."""
    from ..toy.ablation import run_ablation

    try:
        epochs = tuple(int(x) for x in budgets.split(","))
    except ValueError:
        raise typer.BadParameter(f"comma-separated integers expected, got {budgets!r}", param_hint="'--budgets'") from None
    if min(epochs) < 1 or seeds < 1:
        fail("--budgets and --seeds must be ≥ 1", code=2)
    if report is not None:
        output_file(report, "--report")
    with clean_errors():
        table = run_ablation(work or _ABLATION_WORK, train_scenes=train_scenes, val_scenes=val_scenes, budgets=epochs,
                             seeds=tuple(range(seeds)))
    out.print(json.dumps(table, indent=1))
    if report is not None:
        report.write_text(json.dumps(table, indent=1))


@app.command()
def unified(
    work: Annotated[Path | None, typer.Option(help="Scenes, feature caches and heads [~/.cache/mmdiff-gen/toy-ablation, "
                                              "whose caches the ablation shares]; re-run to resume.")] = None,
    train_scenes: Annotated[int, typer.Option()] = 1000,
    val_scenes: Annotated[int, typer.Option()] = 500,
    epochs: Annotated[int, typer.Option(help="Epochs of every head (≥ 1).")] = 12,
    timing_batch: Annotated[int, typer.Option(help="Captions of the timed generation pass.")] = 8,
    report: Annotated[Path | None, typer.Option(help="Write the figures as JSON here.")] = None,
) -> None:
    """The unified multi-task decoder (MMDiff App. C): single-task heads vs heads sharing one aggregation for
    seg + saliency, seg + depth and all three, and the heads' share of a generation pass."""
    from ..toy.unified import run_unified

    if min(epochs, train_scenes, val_scenes, timing_batch) < 1:
        fail("--epochs, --train-scenes, --val-scenes and --timing-batch must be ≥ 1", code=2)
    if report is not None:
        output_file(report, "--report")
    with clean_errors():
        result = run_unified(work or _ABLATION_WORK, train_scenes=train_scenes, val_scenes=val_scenes, epochs=epochs,
                             timing_batch=timing_batch)
    out.print(json.dumps(result, indent=1))
    if report is not None:
        report.write_text(json.dumps(result, indent=1))


@app.command()
def grounding(
    work: Annotated[Path | None, typer.Option(help="Renders, caches, the LoRA and heads [~/.cache/mmdiff-gen/toy-ablation, "
                                              "whose renders and caches the ablation shares]; re-run to resume.")] = None,
    train_scenes: Annotated[int, typer.Option()] = 1000,
    val_scenes: Annotated[int, typer.Option()] = 500,
    steps: Annotated[int, typer.Option(help="LoRA optimiser steps.")] = 600,
    batch_size: Annotated[int, typer.Option()] = 8,
    lr: Annotated[float, typer.Option(help="AdamW rate of the LoRA weights.")] = 1e-4,
    warmup: Annotated[int, typer.Option()] = 50,
    probe_n: Annotated[int, typer.Option(help="Held-out renders of the openseg probe.")] = 200,
    consistency_n: Annotated[int, typer.Option(help="Generated images scored against the oracle.")] = 200,
    fidelity_n: Annotated[int, typer.Option(help="Captions per object count of the fidelity protocol.")] = 100,
    head_epochs: Annotated[int, typer.Option(help="Epochs of the seg head retrained on each backbone.")] = 6,
    layer: Annotated[int | None, typer.Option(help="The expert block (from probe-layers) [the backbone's].")] = None,
    sigma: Annotated[float | None, typer.Option(help="The expert sigma openseg reads [the backbone's].")] = None,
    threshold: Annotated[float | None, typer.Option(help="openseg's background threshold [the backbone's].")] = None,
    report: Annotated[Path | None, typer.Option(help="Write the figures as JSON here.")] = None,
) -> None:
    """Seg4Diff's mask-alignment LoRA on the toy backbone, before / after: openseg on renders and on generated
    images, a seg head retrained on each backbone, and prompt fidelity."""
    from ..toy.grounding import run_grounding
    from ..train.grounding import GroundingConfig

    if report is not None:
        output_file(report, "--report")
    with clean_errors(usage=(ValueError,)):
        cfg = GroundingConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=warmup)
    with clean_errors():
        result = run_grounding(work or _ABLATION_WORK, train_scenes=train_scenes, val_scenes=val_scenes, cfg=cfg,
                               probe_n=probe_n, consistency_n=consistency_n, fidelity_n=fidelity_n,
                               head_epochs=head_epochs,
                               grounding={"layer": layer, "sigma": sigma, "threshold": threshold})
    out.print(json.dumps(result, indent=1))
    if report is not None:
        report.write_text(json.dumps(result, indent=1))


@app.command()
def consistency(
    heads_dir: Annotated[Path | None, typer.Option("--heads", help="Heads folder [the packaged toy heads].")] = None,
    n: Annotated[int, typer.Option("--n", help="Generated images (fresh captions, 1–3 objects).")] = 200,
    batch_size: Annotated[int, typer.Option()] = 25,
    report: Annotated[Path | None, typer.Option(help="Write the metrics as JSON here.")] = None,
    openseg_layer: Annotated[int | None, typer.Option(help="openseg's attention block [the backbone's].")] = None,
    openseg_sigma: Annotated[float | None, typer.Option(help="openseg's sigma [the backbone's].")] = None,
    openseg_threshold: Annotated[float | None, typer.Option(help="openseg's background threshold.")] = None,
) -> None:
    """The consistency protocol: heads' (and openseg's) labels of generated images scored against the
    oracle's, and how much filtering by each quality signal raises the segmentation consistency."""
    from ..backbones.loading import DEFAULT_HEADS
    from ..toy.consistency import run_consistency

    if report is not None:
        output_file(report, "--report")
    with clean_errors():
        result = run_consistency(heads_dir or DEFAULT_HEADS["toy"], n=n, batch_size=batch_size,
                                 grounding={"layer": openseg_layer, "sigma": openseg_sigma,
                                            "threshold": openseg_threshold})
    out.print(json.dumps(result, indent=1))
    if report is not None:
        report.write_text(json.dumps(result, indent=1))


@app.command()
def downstream(
    work: Annotated[Path | None, typer.Option(help="Caches, heads, generated parts and runs "
                                              "[~/.cache/mmdiff-gen/toy-downstream]; re-run to resume.")] = None,
    regimes: Annotated[str, typer.Option(help="Numbers of labelled real renders, comma-separated.")] = "50,200,1000",
    synthetic: Annotated[int, typer.Option(help="Generated images (one pass, shared by every regime).")] = 2000,
    eval_scenes: Annotated[int, typer.Option(help="Held-out renders every model is scored on.")] = 500,
    head_steps: Annotated[int, typer.Option(help="Steps of each MMDiff / t ≈ 0 head.")] = 300,
    steps: Annotated[int, typer.Option(help="Downstream steps from scratch.")] = 600,
    finetune_steps: Annotated[int, typer.Option(help="Real fine-tuning steps after synthetic pretraining.")] = 300,
    width: Annotated[int, typer.Option(help="The downstream U-Net's first-stage width.")] = 32,
    sample_steps: Annotated[int | None, typer.Option(help="Sampling steps [the backbone's].")] = None,
    seed: Annotated[int, typer.Option(help="The downstream models' initialisation and shuffling seed "
                                           "(another seed reuses the heads and generated images).")] = 0,
    report: Annotated[Path | None, typer.Option(help="Also write the report JSON here.")] = None,
) -> None:
    """Does our data train better models? Real only vs synthetic only vs synthetic pretraining + real
    fine-tuning, with labels from MMDiff heads, t ≈ 0 heads, a pixel labeller, openseg and the oracle."""
    from ..toy.downstream import DownstreamConfig, run_downstream

    try:
        sizes = tuple(int(x) for x in regimes.split(","))
    except ValueError:
        raise typer.BadParameter(f"comma-separated integers expected, got {regimes!r}", param_hint="'--regimes'") from None
    if report is not None:
        output_file(report, "--report")
    with clean_errors(usage=(ValueError,)):  # bad settings: a usage error, before anything is written
        cfg = DownstreamConfig(regimes=sizes, synthetic=synthetic, eval_scenes=eval_scenes, head_steps=head_steps,
                               steps=steps, finetune_steps=finetune_steps, width=width, sample_steps=sample_steps,
                               seed=seed)
    with clean_errors():
        result = run_downstream(work or _DOWNSTREAM_WORK, cfg)
    out.print(json.dumps(result, indent=1))
    if report is not None:
        report.write_text(json.dumps(result, indent=1))


@app.command("first-heads")
def first_heads(
    part: Annotated[str, typer.Option(help="captions (exact vs oracle vs empty captions) or distill (heads from N "
                                           "renders vs distilled from N generated images).")],
    work: Annotated[Path | None, typer.Option(help="Renders, captions, caches and heads "
                                              "[~/.cache/mmdiff-gen/toy-first-heads]; re-run to resume.")] = None,
    train_scenes: Annotated[int, typer.Option(help="captions: training renders.")] = 2000,
    ns: Annotated[str, typer.Option("--n", help="distill: numbers of renders / generated images.")] = "200,1000",
    val_scenes: Annotated[int, typer.Option(help="Held-out renders every head is scored on.")] = 500,
    epochs: Annotated[int, typer.Option(help="captions: epochs of each head.")] = 4,
    steps: Annotated[int, typer.Option(help="distill: steps of each head (batch 16).")] = 200,
    consistency_n: Annotated[int, typer.Option(help="distill: generated images of the consistency protocol.")] = 200,
    report: Annotated[Path | None, typer.Option(help="Write the figures as JSON here.")] = None,
) -> None:
    """Heads without the paper's inputs: whether real images' captions matter, and heads distilled from generated
    images labelled by the oracle against heads trained on labelled renders."""
    from ..toy.first_heads import caption_study, distill_study

    if part not in ("captions", "distill"):
        raise typer.BadParameter(f"choose captions or distill, got {part!r}", param_hint="'--part'")
    try:
        sizes = tuple(int(x) for x in ns.split(","))
    except ValueError:
        raise typer.BadParameter(f"comma-separated integers expected, got {ns!r}", param_hint="'--n'") from None
    if min(train_scenes, val_scenes, epochs, steps, consistency_n, *sizes) < 1:
        fail("--train-scenes, --val-scenes, --epochs, --steps, --consistency-n and --n must be ≥ 1", code=2)
    if report is not None:
        output_file(report, "--report")
    folder = work or Path.home() / ".cache" / "mmdiff-gen" / "toy-first-heads"
    with clean_errors():
        if part == "captions":
            result = caption_study(folder, train_scenes=train_scenes, val_scenes=val_scenes, epochs=epochs)
        else:
            result = distill_study(folder, ns=sizes, val_scenes=val_scenes, steps=steps, consistency_n=consistency_n)
    out.print(json.dumps(result, indent=1))
    if report is not None:
        report.write_text(json.dumps(result, indent=1))


_DOWNSTREAM_WORK = Path.home() / ".cache" / "mmdiff-gen" / "toy-downstream"
_HEADS_WORK = Path.home() / ".cache" / "mmdiff-gen" / "toy-heads"
_ABLATION_WORK = Path.home() / ".cache" / "mmdiff-gen" / "toy-ablation"
