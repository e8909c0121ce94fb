"""The paper's training recipes as data — one frozen record per dataset — and what a run of one costs.

A recipe names the task(s), the dataset kind and splits, the image size and the training settings (MMDiff §4: 512²,
20 epochs, batch 16, AdamW 1e-4) and the captioner (Gemma-3-4B, §4.4). What is captured is not repeated here: the
paper's sigmas (capture.spec.PAPER_SIGMAS), the backbone's default layers (FLUX.1-dev: 4, 15, 26, 37) and the tasks'
concept sets, as `extract` captures them (`feature_cache.dataset_spec`), so the cost plan and the run agree by
construction. `jobs/recipe.py` runs one; `train --recipe` is its command.

The cost of a run is arithmetic on counts taken without loading any weights: the transformer's FLOPs per extracted
image (one forward of its noised copies, counted on the meta device from the backbone's config), the head's FLOPs,
and the bytes a cache stores per sample for the chosen codec.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..backbones.base import Backbone
from ..backbones.flops import forward_flops
from ..heads.model import head_flops
from ..tasks import canonical, class_task
from ..tasks import get as get_task
from .feature_cache import dataset_spec
from .feature_codec import DEFAULT, check_codec, stored_bytes
from .trainer import TrainConfig, head_config

CAPTIONER = "google/gemma-3-4b-it"  # MMDiff §4.4: real images captioned with Gemma-3-4B
# The GPU-time assumption of every cost plan: an A100's dense bf16 peak (312 TFLOP/s; an H100 SXM's is 989) at a
# model-FLOPs utilisation of 40%, typical of large transformer forwards. Plans scale inversely with it.
PEAK_FLOPS = 312e12
MFU = 0.4
SUSTAINED_FLOPS = PEAK_FLOPS * MFU
GPU_NOTE = "A100 bf16 peak 312 TFLOP/s × 40% MFU"
TRAIN_FLOPS = 3  # a training step ≈ forward + backward (2 × forward) of the head


@dataclass(frozen=True)
class Recipe:
    """One dataset's training recipe.

    Args:
        name: what `--recipe` calls it.
        tasks: the trained task(s) of its one head (several: one multi-task head sharing an aggregation).
        head: the head file's stem in the heads folder (`generate --heads DIR` finds TASK.safetensors first).
        kinds: the dataset kinds (`--data KIND:PATH`) it reads.
        train_split, eval_split: the splits it trains and scores on (None: the reader's default / none).
        mat_splits: (train, eval) splits of a labelled `.mat` source instead (NYU's labelled file: train / test).
        size: images resized and center-cropped to size × size.
        epochs, batch_size, lr: as `TrainConfig` (batch per process).
        decoder_channels: decoder width (None: the head's default, 256).
        codec: how the feature cache stores features (`feature_codec`; default int8: half the disk of bf16).
        captioner: the model that captions each image (a VLM id, or the toy world's `oracle`).
    """

    name: str
    tasks: tuple[str, ...]
    head: str
    kinds: tuple[str, ...]
    train_split: str | None
    eval_split: str | None
    size: int
    epochs: int = 20
    batch_size: int = 16
    lr: float = 1e-4
    decoder_channels: int | None = None
    codec: str = DEFAULT
    captioner: str = CAPTIONER
    mat_splits: tuple[str, str] | None = None

    def __post_init__(self):
        object.__setattr__(self, "tasks", canonical(self.tasks))
        check_codec(self.codec)
        if min(self.size, self.epochs, self.batch_size) < 1 or not self.lr > 0:
            raise ValueError(f"recipe {self.name}: size, epochs and batch size must be ≥ 1 and lr > 0")
        if self.decoder_channels is not None and self.decoder_channels < 1:
            raise ValueError(f"recipe {self.name}: decoder_channels must be ≥ 1")

    def splits(self, data: str) -> tuple[str | None, str | None]:
        """(train, eval) splits of the source `data` ("KIND:PATH")."""
        if self.mat_splits is not None and data.lower().endswith(".mat"):
            return self.mat_splits
        return self.train_split, self.eval_split

    def train_config(self, *, dino: bool = False) -> TrainConfig:
        """How its head is trained (the paper's optimiser, EMA and side maps: TrainConfig's defaults)."""
        head = (("decoder_channels", self.decoder_channels),) if self.decoder_channels else ()
        return TrainConfig(tasks=self.tasks, epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, head=head,
                           dino=dino)


# MMDiff §4: each task's head on its standard benchmark, 512², 20 epochs, batch 16, AdamW 1e-4.
RECIPES: dict[str, Recipe] = {r.name: r for r in (
    # PASCAL VOC 2012: SBD-augmented train_aug (10 582) → val (1 449)
    Recipe("voc", ("seg",), "seg", ("voc",), "train_aug", "val", 512),
    # DUTS: DUTS-TR (10 553) → DUTS-TE (5 019)
    Recipe("duts", ("saliency",), "saliency", ("duts",), "TR", "TE", 512),
    # NYU Depth v2: the BTS lists (Eigen split; test scored in the Eigen crop), or the labelled .mat's 795 / 654
    Recipe("nyu", ("depth",), "depth", ("nyu",), "nyudepthv2_train_files_with_gt.txt",
           "nyudepthv2_test_files_with_gt.txt", 512, mat_splits=("train", "test")),
    # The toy world (`toy render` folders; --eval-data another folder): one multi-task head for all three tasks, so
    # one cache and one training exercise every decoder; the toy heads' settings (toy/heads_recipe.py: decoder 32
    # wide, lr 1e-3) at the toy backbone's 64²; 8 epochs of batch 8 train ~100 renders in about a minute on a CPU
    # (batch 16 takes as long per epoch for half the steps: mIoU 24 instead of 51 after 4 epochs); the oracle
    # captions the renders.
    Recipe("toy", ("seg", "saliency", "depth"), "unified", ("folder", "files"), None, None, 64, epochs=8,
           batch_size=8, lr=1e-3, decoder_channels=32, captioner="oracle"),
)}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise KeyError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}") from None


@dataclass(frozen=True)
class PerImage:
    """What one image costs, counted from the backbone's config on the meta device (no weights).

    Args:
        forward_flops: one transformer forward of the image's T noised copies (extraction).
        head_flops: one forward of the recipe's head on its features.
        features: (L, T, N, C) of the features a cache stores.
        other_bytes: what a cache stores beside the features: concept maps (T, K, N) float32, labels, index.
    """

    forward_flops: int
    head_flops: int
    features: tuple[int, int, int, int]
    other_bytes: int

    def cache_bytes(self, codec: str) -> int:
        """Bytes one sample takes in a cache of `codec` (cache.json's bytes_per_sample)."""
        return stored_bytes(self.features, codec) + self.other_bytes


def per_image(backbone: Backbone, recipe: Recipe, *, labels: Mapping[str, np.ndarray], num_classes: int) -> PerImage:
    """`PerImage` of the recipe on `backbone` (a loaded or a `meta_backbone`); `labels`: one sample's label maps at the
    recipe's size (every trained task the dataset has is cached), `num_classes`: its class count."""
    spec = dataset_spec(recipe.tasks, False, "feature")
    size = recipe.size
    grid = backbone.token_grid(size, size)
    n, c, t = grid[0] * grid[1], backbone.feature_dim, len(spec.sigmas)
    layers = len(spec.layers if spec.layers is not None else backbone.default_layers(blocks=spec.blocks))
    k = len(spec.concepts)
    cfg = recipe.train_config()
    hc = head_config(cfg, feature_dim=c, num_layers=layers, num_timesteps=t, num_side=k,
                     num_classes=num_classes if class_task(recipe.tasks) else 1, grid=grid)
    label_bytes = sum(np.asarray(v).astype(get_task(name).label_dtype).nbytes for name, v in labels.items()
                      if get_task(name).trained)
    return PerImage(forward_flops=forward_flops(backbone, rows=t, height=size, width=size),
                    head_flops=head_flops(hc, grid, (size, size)),
                    features=(layers, t, n, c), other_bytes=t * k * n * 4 + label_bytes + 8)  # + int64 index


@dataclass(frozen=True)
class CostLine:
    """One stage of a plan: images it handles (per pass), FLOPs (None: not estimated), bytes written and read."""

    stage: str
    images: int
    flops: float | None
    disk: int = 0
    reads: int = 0


def plan_cost(recipe: Recipe, per: PerImage, *, train_images: int, eval_images: int, no_cache: bool = False,
              captioner: str | None = None) -> list[CostLine]:
    """The stages of a run and what each costs. Extraction: one transformer forward per image; training: epochs ×
    (TRAIN_FLOPS × the head's forward), plus an extraction per image and epoch without a cache; evaluation: one head
    forward per image (plus its extraction without a cache). Disk: the caches (none with `no_cache`); reads: the
    training epochs and the evaluation pass over them. `captioner`: a caption stage (its FLOPs not estimated)."""
    b = 0 if no_cache else per.cache_bytes(recipe.codec)
    live = per.forward_flops if no_cache else 0
    lines = [CostLine(f"caption ({captioner})", train_images + eval_images, None)] if captioner else []
    if not no_cache:
        lines += [CostLine("extract train", train_images, train_images * per.forward_flops, disk=train_images * b),
                  CostLine("extract eval", eval_images, eval_images * per.forward_flops, disk=eval_images * b)]
    lines += [CostLine(f"train: {recipe.epochs} epochs" + (", extracting each batch" if no_cache else ""),
                       train_images, recipe.epochs * train_images * (TRAIN_FLOPS * per.head_flops + live),
                       reads=recipe.epochs * train_images * b),
              CostLine("eval", eval_images, eval_images * (per.head_flops + live), reads=eval_images * b)]
    return lines


def cost_table(lines: list[CostLine], *, title: str, flops_per_s: float = SUSTAINED_FLOPS, note: str = GPU_NOTE):
    """A rich Table of `plan_cost`'s lines and their total; GPU time at `flops_per_s` (described by `note`)."""
    from rich.table import Table

    table = Table(title=title, caption=f"GPU time at {flops_per_s / 1e12:.0f} TFLOP/s ({note}); transformer and head "
                                       "FLOPs only (VAE, text encoder, concept stream and captioning not counted)")
    for name, justify in (("stage", "left"), ("images", "right"), ("FLOP", "right"), ("GPU time", "right"),
                          ("scratch disk", "right"), ("read", "right")):
        table.add_column(name, justify=justify)
    for x in lines:
        table.add_row(x.stage, f"{x.images:,}", "—" if x.flops is None else si(x.flops),
                      "—" if x.flops is None else duration(x.flops / flops_per_s), binary(x.disk), binary(x.reads))
    flops = sum(x.flops or 0 for x in lines)
    table.add_row("total", "", si(flops), duration(flops / flops_per_s), binary(sum(x.disk for x in lines)),
                  binary(sum(x.reads for x in lines)), style="bold")
    return table


def si(x: float) -> str:
    """86.01e12 → "86.0 T"."""
    for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g}"


def binary(n: float) -> str:
    """Bytes in binary units: 100663296 → "96.0 MiB"; 0 → "0"."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B" if n else "0"


def duration(seconds: float) -> str:
    """Seconds as the largest fitting unit: "2.03 h", "4.1 min", "12 s", "<1 s"."""
    if seconds >= 3600:
        return f"{seconds / 3600:.3g} h"
    if seconds >= 60:
        return f"{seconds / 60:.2g} min"
    return f"{seconds:.2g} s" if seconds >= 1 else "<1 s"
