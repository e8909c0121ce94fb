"""One recipe, end to end: caption → extract → train → eval → card, each stage skipped when its output is finished.

`plan_recipe` counts what a run will cost before anything loads (dataset sizes; FLOPs and bytes from the backbone's
config on the meta device: `train/recipes.py`). `run_recipe` runs the stages with the library's own functions:

- caption: `caption_dataset` into WORK/captions_{train,eval}.jsonl (skipped when the file has every key; it resumes
  by itself otherwise). The captioner is loaded once, used, and freed before the backbone loads (GPU memory).
- extract: `extract_dataset` into WORK/cache_{train,eval} (skipped when the cache is finished and its cache.json
  matches this run, checked without loading the backbone; a finished cache of other inputs is refused by
  `extract_dataset`). Not run with `no_cache`: training extracts each batch (`LiveFeatures`).
- train + eval: `train_head` writes OUT/HEAD.safetensors, having scored its EMA weights on the eval split and
  recorded the metrics in it (skipped when the head file records this training config and an evaluation; resumed
  from its last epoch's state otherwise, so a run killed during evaluation only evaluates again).
- card: `write_card` refreshes OUT's config.json and model card, always.

A finished head makes the earlier stages unnecessary: they are skipped even when their outputs were deleted (a
1 TB cache may be removed once its head is trained). The backbone is loaded at most once per run: to extract, or to
train and score without a cache. Several processes (torchrun): each stage splits by rank as its function does
(caption batches, cache shards, the training batch); ranks meet after captioning (every rank waits for the
assembled captions) and after extraction (`wait_for_cache`); the card is written by rank 0.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .._workers import wait_for
from ..backbones import load_backbone
from ..backbones.loading import meta_backbone
from ..heads.card import write_card
from ..heads.checkpoint import read_meta
from ..io.datasets import open_dataset
from ..tasks import get as get_task
from ..train.feature_cache import (FeatureCache, captions_digest, dataset_spec, extract_dataset, finished_cache,
                                   keys_digest, open_live, wait_for_cache)
from ..train.recipes import CostLine, PerImage, Recipe, per_image, plan_cost
from ..train.trainer import train_head
from .caption import CaptionerChoice, caption_dataset, captioned, check_output

CAPTION_BATCH = 16  # images per captioner call: the unit of caption resume (`caption --batch-size`'s default)
SPLITS = ("train", "eval")


@dataclass(frozen=True)
class RecipeRun:
    """One run of a recipe (after the user's overrides: `dataclasses.replace(recipe, epochs=…)`).

    Args:
        recipe: what to run.
        model: the backbone (`load_backbone`'s name).
        data: the training source, "KIND:PATH" of one of the recipe's kinds.
        work: the folder of its captions and feature caches (resumable).
        out: the heads folder: OUT/<recipe.head>.safetensors, config.json, README.md.
        eval_data: the evaluation source (None: `data`, with the recipe's eval split).
        train_split, eval_split: override the recipe's splits (None: the recipe's for this source).
        captioner: how to caption (None: no caption stage: `captions`, or empty prompts).
        captions: an existing captions file for both splits' images (instead of a caption stage).
        no_cache: extract each training batch instead of caching (no scratch disk, an extraction per epoch).
        device, dtype: where and in what the backbone computes (this worker's device).
        dino: a DINOv3 folder whose maps join the head's inputs (MMDiff §3.3).
        lora, lora_scale: a LoRA loaded into the transformer.
        extract_batch: images per transformer forward when extracting (× the number of sigmas).
        rank, world_size: this worker among several (torchrun); training ranks are accelerate's.
    """

    recipe: Recipe
    model: str
    data: str
    work: Path
    out: Path
    eval_data: str | None = None
    train_split: str | None = None
    eval_split: str | None = None
    captioner: CaptionerChoice | None = None
    captions: Path | None = None
    no_cache: bool = False
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    dino: Path | None = None
    lora: Path | None = None
    lora_scale: float = 1.0
    extract_batch: int = 4
    rank: int = 0
    world_size: int = 1

    def __post_init__(self):
        kind = self.data.split(":", 1)[0].lower() if ":" in self.data else "files"
        if kind not in self.recipe.kinds:
            raise ValueError(f"recipe {self.recipe.name} reads {' or '.join(k + ':PATH' for k in self.recipe.kinds)} "
                             f"data, got {self.data}")
        train, evaluate = self.sources()
        if evaluate == train:
            raise ValueError(f"recipe {self.recipe.name} needs evaluation data apart from its training data: give "
                             "--eval-data (another folder) or --eval-split")

    def sources(self) -> tuple[tuple[str, str | None], tuple[str, str | None]]:
        """((data, split) to train on, (data, split) to score on)."""
        train, evaluate = self.recipe.splits(self.data)
        train = self.train_split if self.train_split is not None else train
        evaluate = self.eval_split if self.eval_split is not None else (evaluate if self.eval_data is None else None)
        return (self.data, train), (self.eval_data or self.data, evaluate)

    @property
    def head_path(self) -> Path:
        return Path(self.out) / f"{self.recipe.head}.safetensors"

    def captions_path(self, which: str) -> Path | None:
        """The captions file of split `which` ("train" / "eval"): the given one, the caption stage's, or None."""
        if self.captions is not None:
            return self.captions
        return Path(self.work) / f"captions_{which}.jsonl" if self.captioner is not None else None


@dataclass(frozen=True)
class RecipePlan:
    """What `plan_recipe` found: images per split, classes, one image's cost and the stages' costs."""

    images: dict[str, int]
    classes: list[str]
    per_image: PerImage
    lines: list[CostLine]


def plan_recipe(run: RecipeRun) -> RecipePlan:
    """Open both splits (counts, classes, one sample's labels) and the backbone's config on the meta device (no
    weights), and cost the run (`train.recipes.plan_cost`). Seconds, whatever the backbone's size."""
    (data, split), (eval_data, eval_split) = run.sources()
    train = open_dataset(data, split=split, size=run.recipe.size)
    evaluate = open_dataset(eval_data, split=eval_split, size=run.recipe.size)
    if not len(train) or not len(evaluate):
        raise ValueError(f"no images in {data if not len(train) else eval_data}")
    backbone = meta_backbone(run.model)
    per = per_image(backbone, run.recipe, labels=train[0].labels, num_classes=len(train.classes) or 1)
    lines = plan_cost(run.recipe, per, train_images=len(train), eval_images=len(evaluate), no_cache=run.no_cache,
                      captioner=run.captioner and run.recipe.captioner)
    return RecipePlan(images={"train": len(train), "eval": len(evaluate)}, classes=list(train.classes),
                      per_image=per, lines=lines)


@dataclass
class RecipeResult:
    """What a run did: each stage's outcome ("ran", "skipped: …"), the head file and its metrics by task."""

    stages: dict[str, str]
    head: Path
    metrics: dict[str, dict]


def run_recipe(run: RecipeRun, report: Callable[[str, str], None] | None = None) -> RecipeResult:
    """Run the stages of `run` that are not finished (module docstring); `report(stage, outcome)` hears each one."""
    stages: dict[str, str] = {}

    def note(stage: str, outcome: str) -> None:
        stages[stage] = outcome
        if report is not None:
            report(stage, outcome)

    recipe, cfg = run.recipe, run.recipe.train_config(dino=run.dino is not None)
    head = run.head_path
    sources = dict(zip(SPLITS, run.sources()))
    if _head_done(head, cfg):
        for stage in ("caption", "extract", "train+eval"):
            note(stage, f"skipped: {head} is trained and scored")
    else:
        _caption(run, sources, note)
        if run.no_cache:
            note("extract", "skipped: no cache (training extracts each batch)")
        backbone = None if run.no_cache else _extract(run, sources, note)
        del backbone  # the weights leave before the head trains (capture's hooks form a cycle: collect it)
        gc.collect()
        _train(run, sources, cfg, note)
    meta = read_meta(head) if head.is_file() else None
    metrics = {} if meta is None else {k: v for k, v in meta.metrics.items() if k != "train"}
    by_task = metrics if len(recipe.tasks) > 1 else {recipe.tasks[0]: metrics}
    if run.rank == 0:
        try:
            write_card(run.out)
            note("card", f"ran: {Path(run.out) / 'README.md'}")
        except ValueError as e:  # someone else's README.md in the folder: the head stands without a card
            note("card", f"skipped: {e}")
    return RecipeResult(stages=stages, head=head, metrics=by_task)


def _head_done(head: Path, cfg) -> bool:
    """The head file exists, records this training config (epochs included) and an evaluation."""
    if not head.is_file():
        return False
    train = read_meta(head).metrics.get("train", {})
    return train.get("config") == json.loads(json.dumps(asdict(cfg))) and "eval" in train


def _caption(run: RecipeRun, sources: dict, note: Callable[[str, str], None]) -> None:
    if run.captioner is None:
        note("caption", f"skipped: {'captions from ' + str(run.captions) if run.captions else 'no captioner'}")
        return
    Path(run.work).mkdir(parents=True, exist_ok=True)
    identity = run.captioner.identity()
    captioner, done = None, []
    for which, (data, split) in sources.items():
        path = run.captions_path(which)
        dataset = open_dataset(data, split=split)  # captioned as stored (the VLM sees the whole image)
        check_output(path, identity)  # refuses a file of another captioner before any loading
        if captioned(path, dataset.keys) == len(dataset):
            done.append(which)
            continue
        if captioner is None:
            captioner = run.captioner.load()
        caption_dataset(captioner, dataset, path, batch_size=CAPTION_BATCH, rank=run.rank,
                        world_size=run.world_size, progress=True)
        if run.world_size > 1:  # worker 0 assembles the file; everyone extracts with it
            wait_for(lambda: captioned(path, dataset.keys), len(dataset), f"captions in {path}")
    del captioner  # freed before the backbone loads: a VLM and FLUX need not share a GPU
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    note("caption", "skipped: every image is captioned" if len(done) == len(sources) else
         "ran" + (f" (the {done[0]} split was captioned already)" if done else ""))


def _load(run: RecipeRun):
    """(backbone, DINOv3 or None) on this worker's device."""
    bb = load_backbone(run.model, dtype=run.dtype, device=run.device, lora=run.lora, lora_scale=run.lora_scale)
    if run.dino is None:
        return bb, None
    from ..backbones.dino import DinoFeatures

    return bb, DinoFeatures.load(run.dino, device=run.device, dtype=run.dtype)


def _cache_expected(run: RecipeRun, backbone: dict, data: str, split: str | None, captions: Path | None) -> dict:
    """What a finished cache of this split must record, known without loading the backbone (`backbone`: the
    identity of its meta twin)."""
    dataset = open_dataset(data, split=split)
    size = run.recipe.size
    return {"backbone": backbone, "codec": run.recipe.codec, "captions_sha256": captions_digest(captions),
            "count": len(dataset), "keys_sha256": keys_digest(
        dataset.keys), "image_size": [size, size], "seed": 0, "dino": {},
            "spec": json.loads(json.dumps(dataset_spec(run.recipe.tasks, False, "feature").to_dict()))}


def _extract(run: RecipeRun, sources: dict, note: Callable[[str, str], None]):
    """Fill the caches that are not finished; returns the backbone if it was loaded (the caller frees it)."""
    todo = list(sources)
    if run.lora is None and run.dino is None:  # else only the loaded backbone can tell its identity: always load
        identity = meta_backbone(run.model).identity()
        todo = [which for which, (data, split) in sources.items()
                if not finished_cache(Path(run.work) / f"cache_{which}",
                                      _cache_expected(run, identity, data, split, run.captions_path(which)))]
    if not todo:
        note("extract", "skipped: both caches are finished")
        return None
    bb, dino = _load(run)
    for which in todo:
        data, split = sources[which]
        folder = Path(run.work) / f"cache_{which}"
        extract_dataset(bb, data, folder, list(run.recipe.tasks), split=split, size=run.recipe.size,
                        captions=run.captions_path(which), batch_size=run.extract_batch, codec=run.recipe.codec,
                        dino=dino, rank=run.rank, world_size=run.world_size)
        if run.world_size > 1:
            wait_for_cache(folder)
    note("extract", "ran" + ("" if len(todo) == len(sources) else f" (the {todo[0]} cache only)"))
    return bb


def _train(run: RecipeRun, sources: dict, cfg, note: Callable[[str, str], None]) -> None:
    if run.no_cache:
        bb, dino = _load(run)
        train, evaluate = (open_live(bb, data, list(run.recipe.tasks), split=split, size=run.recipe.size,
                                     captions=run.captions_path(which), dino=dino,
                                     extract_batch_size=run.extract_batch)
                           for which, (data, split) in sources.items())
    else:
        train, evaluate = (FeatureCache(Path(run.work) / f"cache_{which}") for which in SPLITS)
    classes = train.manifest.get("classes") or []
    if any(get_task(t).kind == "classes" for t in run.recipe.tasks) and not classes:
        raise ValueError(f"{sources['train'][0]} records no class names: give it a classes.txt")
    train_head(train, cfg, run.head_path, classes=classes, palette=train.manifest.get("palette"), eval_cache=evaluate,
               depth_unit="metre" if any(get_task(t).kind == "positive" for t in run.recipe.tasks) else "")
    note("train+eval", f"ran: {run.head_path}, scored on {evaluate.record.get('data', '')}")
