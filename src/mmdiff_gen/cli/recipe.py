"""`train --recipe`: one command per recipe (caption → extract → train → eval → card), what it costs printed first."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import typer

from ._errors import clean_errors, fail
from ._options import torch_dtype, worker
from .caption import captioner_choice
from .heads import EXTRACT_BATCH, _print_metrics, group_env, out

# train's options a recipe run takes from the recipe and the work folder instead, and why.
NOT_WITH_RECIPE = {"task": "the recipe names its tasks", "cache": "its caches are in --work",
                   "eval_cache": "its caches are in --work", "side": "a recipe trains the paper's head (ablations: "
                   "train --cache)", "timesteps": "a recipe trains the paper's head (ablations: train --cache)",
                   "fusion": "a recipe trains the paper's head (ablations: train --cache)"}
# train's options that override the recipe's value when given on the command line.
OVERRIDES = ("epochs", "batch_size", "lr", "codec", "size", "decoder_channels")


def _given(ctx: typer.Context) -> set[str]:
    """The parameters the user set (command line or environment), not left at their defaults. By the source's name:
    typer vendors its own click, whose ParameterSource is not click's."""
    return {k for k in ctx.params if getattr(ctx.get_parameter_source(k), "name", "") in ("COMMANDLINE", "ENVIRONMENT")}


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def train_recipe(ctx: typer.Context) -> None:
    """`train` with --recipe: validate, print the cost plan, then run the stages (`jobs.recipe.run_recipe`)."""
    p, given = ctx.params, _given(ctx)
    from ..jobs.recipe import RecipeRun, plan_recipe, run_recipe
    from ..train.recipes import get_recipe

    with clean_errors(usage=(KeyError, ValueError)):
        recipe = get_recipe(p["recipe"])
        recipe = replace(recipe, **{k: p[k] for k in OVERRIDES if k in given})  # checked by Recipe
    refused = [k for k in NOT_WITH_RECIPE if k in given]
    if refused:
        fail(f"{_option(refused[0])} does not go with --recipe: {NOT_WITH_RECIPE[refused[0]]}", code=2)
    if p["data"] is None:
        fail(f"--data is required: the recipe reads {' or '.join(k + ':PATH' for k in recipe.kinds)}", code=2)
    if p["out_path"] is not None and p["out_path"].suffix == ".safetensors":
        fail(f"with --recipe, --out is the heads folder (it writes {recipe.head}.safetensors there), "
             f"got {p['out_path']}", code=2)
    name = p["captioner"] or recipe.captioner
    if p["captions"] is not None and p["captioner"] is not None:
        fail("--captions and --captioner exclude each other (--captions: captions already made)", code=2)
    recipe = replace(recipe, captioner=name)
    dry = p["dry_run"]
    # A dry run plans a GPU run from anywhere: this machine's devices are not asked about.
    dev, rank, world = ("cpu", 0, 1) if dry else worker(p["device"], group_env())[:3]
    captions_made = p["captions"] is None and name != "none"
    choice = captioner_choice(name, device=dev, dtype=p["dtype"]) if captions_made else None
    with clean_errors(usage=(ValueError,)):
        run = RecipeRun(recipe=recipe, model=p["model"], data=p["data"], work=p["work"] or Path("."),
                        out=p["out_path"] or Path("."),
                        eval_data=p["eval_data"], train_split=p["split"], eval_split=p["eval_split"], captioner=choice,
                        captions=p["captions"], no_cache=p["no_cache"], device=dev, dtype=torch_dtype(p["dtype"], dev),
                        dino=p["dino"], lora=p["lora"], lora_scale=p["lora_scale"], extract_batch=EXTRACT_BATCH,
                        rank=rank, world_size=world)
    if not dry and (p["work"] is None or p["out_path"] is None):
        fail("--recipe needs --work (the folder of its captions and caches) and --out (the heads folder)", code=2)
    with clean_errors():
        plan = plan_recipe(run)
    (data, split), (eval_data, eval_split) = run.sources()
    out.print(f"recipe {recipe.name}: {'+'.join(recipe.tasks)} head on {p['model']}, {recipe.size}², {recipe.epochs} "
              f"epochs, batch {recipe.batch_size}, lr {recipe.lr:g}, "
              + ("no cache" if run.no_cache else f"{recipe.codec} cache") + f", captioner {name}\n"
              f"train: {data}{' ' + split if split else ''} ({plan.images['train']:,} images); "
              f"eval: {eval_data}{' ' + eval_split if eval_split else ''} ({plan.images['eval']:,} images)",
              highlight=False, soft_wrap=True)
    from ..train.recipes import cost_table

    out.print(cost_table(plan.lines, title=f"what recipe {recipe.name} will cost"))
    if dry:
        return
    with clean_errors():
        result = run_recipe(run, report=lambda stage, outcome: out.print(f"{stage}: {outcome}", highlight=False,
                                                                         soft_wrap=True))
    _print_metrics(result.metrics)
