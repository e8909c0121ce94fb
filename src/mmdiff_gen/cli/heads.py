"""`extract`, `train`, `eval`: feature caches from labelled images, head training, head scoring."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ._errors import clean_errors, fail
from ._options import Device, Dtype, Model, parse_tasks, resolve_device, torch_dtype

out = Console()


def extract(
    data: Annotated[Path, typer.Option(help="Labelled images (files layout, e.g. from `toy render`).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Feature-cache folder (resumable).")],
    model: Model = "toy",
    tasks: Annotated[str, typer.Option(help="Tasks whose paper concept sets are captured.")] = "seg,saliency,depth",
    cross_attention: Annotated[bool, typer.Option(help="Also store averaged cross-attention maps.")] = False,
    batch_size: Annotated[int, typer.Option(help="Images per transformer forward (× number of sigmas).")] = 16,
    shard_size: Annotated[int, typer.Option(help="Samples per shard.")] = 256,
    seed: Annotated[int, typer.Option(help="Noise seed base; sample i uses seed + i.")] = 0,
    device: Device = "auto",
    dtype: Dtype = "auto",
) -> None:
    """Encode labelled images once in real-image mode and store features, concept maps and labels."""
    from ..backbones import load_backbone
    from ..capture import CaptureSpec
    from ..io.readers import FilesDataset
    from ..train.feature_cache import build_cache

    task_list = list(parse_tasks(tasks))
    with clean_errors():
        ds = FilesDataset(data)
        bb = load_backbone(model, dtype=torch_dtype(dtype, resolve_device(device)), device=resolve_device(device))
        spec = CaptureSpec.for_tasks(task_list, cross_attention=cross_attention, store_device="cpu")
        build_cache(bb, ds, spec, out_dir, shard_size=shard_size, batch_size=batch_size, seed=seed)
    out.print(f"feature cache of {len(ds)} samples in {out_dir}")


def train(
    cache: Annotated[Path, typer.Option(help="Training feature cache.")],
    task: Annotated[str, typer.Option(help="seg, saliency (sal) or depth.")],
    out_path: Annotated[Path, typer.Option("--out", help="Head file to write (.safetensors).")],
    eval_cache: Annotated[Path | None, typer.Option(help="Validation feature cache, scored at the end.")] = None,
    epochs: Annotated[int, typer.Option()] = 20,
    batch_size: Annotated[int, typer.Option()] = 16,
    lr: Annotated[float, typer.Option()] = 1e-4,
    side: Annotated[str, typer.Option(help="Side maps: concepts, cross, both or none.")] = "concepts",
    timesteps: Annotated[str | None, typer.Option(help="Sigma indices to use, e.g. 3 (default: all).")] = None,
    fusion: Annotated[str, typer.Option(help="learned (paper) or mean (ablation).")] = "learned",
    decoder_channels: Annotated[int | None, typer.Option(help="Decoder width (default 256).")] = None,
) -> None:
    """Train one head on a feature cache (resumable; multi-GPU with `accelerate launch`)."""
    from ..train.feature_cache import FeatureCache
    from ..train.trainer import TrainConfig, train_head

    picked = parse_tasks(task)
    if len(picked) != 1:
        raise typer.BadParameter(f"train one task at a time, got {task!r}")
    t = picked[0]
    head = (("decoder_channels", decoder_channels),) if decoder_channels else ()
    with clean_errors():
        steps = tuple(int(x) for x in timesteps.split(",")) if timesteps else None
        cfg = TrainConfig(task=t, epochs=epochs, batch_size=batch_size, lr=lr, side=side, timesteps=steps,
                          fusion=fusion, head=head)
        tr = FeatureCache(cache)
        ev = FeatureCache(eval_cache) if eval_cache else None
        classes = tr.manifest.get("classes") or []
        if t == "seg" and not classes:
            fail(f"{cache} records no class names: extract it from a dataset with classes.txt")
        metrics = train_head(tr, cfg, out_path, classes=classes, palette=tr.manifest.get("palette"), eval_cache=ev,
                             depth_unit="metre" if t == "depth" else "")
    _print_metrics(t, metrics)


def evaluate(
    head: Annotated[Path, typer.Option(help="Head file (.safetensors).")],
    cache: Annotated[Path, typer.Option(help="Feature cache to score on.")],
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the metrics here.")] = None,
) -> None:
    """Score a head on a feature cache: prints a table, optionally writes JSON."""
    from ..heads.checkpoint import load_head
    from ..train.evaluate import evaluate_head
    from ..train.feature_cache import FeatureCache

    with clean_errors():
        fc = FeatureCache(cache)
        model, meta = load_head(head, backbone=fc.manifest["backbone"])
        steps = meta.timestep_indices(list(fc.spec.sigmas))
        metrics = evaluate_head(model, meta.config.task, meta.side, steps, fc, meta.classes)
    _print_metrics(meta.config.task, metrics)
    if json_out is not None:
        json_out.write_text(json.dumps(metrics, indent=1))


def _print_metrics(task: str, metrics: dict) -> None:
    if not metrics:
        return
    t = Table(title=f"{task} metrics")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in metrics.items():
        if isinstance(v, (int, float)):
            t.add_row(k, f"{v:.4f}")
    out.print(t)
