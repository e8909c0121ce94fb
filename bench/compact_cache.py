"""Compact feature caches on the toy backbone: what 8-bit features change, what they save, and what training without
a cache costs.

One command, one run (resumable: renders and caches are kept in --work):

    python bench/compact_cache.py [--work DIR] [--train 2000] [--val 500] [--epochs 4] [--json out.json]
    python bench/compact_cache.py --smoke      # the tiny random backbone, 6 + 4 scenes: seconds

1. Codecs: the held-out renders' bf16 cache re-encoded with each 8-bit codec (int8 / fp8 e4m3, a scale per token
   or per channel): the relative L2 error of the features and the shipped heads' metrics on the decoded features,
   against bf16.
2. Retrained: one head for segmentation, saliency and depth (a shared aggregation) trained from a bf16 cache and
   from an 8-bit cache of the same renders (same seeds, same steps), each scored on the held-out cache of its codec.
3. Disk per sample of each cache as written, and the epoch time of the same head read from the bf16 cache, from
   the 8-bit cache and with no cache (features extracted for each batch: `train --no-cache`).
4. With --flux-geometry: the bytes per sample of a bf16 and an 8-bit cache of one 512² image extracted by a
   random FLUX-architecture transformer of FLUX.1-dev's width (3 072) and token grid (32 × 32), its 4 single-stream
   blocks standing for the paper's 4 captured layers (≈ 1 B parameters: minutes on a CPU; a cache's bytes depend
   on its shapes only, not on the weights).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from mmdiff_gen.backbones import load_backbone
from mmdiff_gen.backbones.loading import DEFAULT_HEADS
from mmdiff_gen.capture import CaptureSpec
from mmdiff_gen.heads.checkpoint import load_head
from mmdiff_gen.io.readers import FilesDataset
from mmdiff_gen.toy.heads_recipe import TASKS, TOY_HEAD, TRAIN_SEED, VAL_SEED
from mmdiff_gen.toy.render import write_scenes
from mmdiff_gen.toy.world import CLASSES
from mmdiff_gen.train.evaluate import evaluate_head
from mmdiff_gen.train.feature_cache import FeatureCache, LiveFeatures, build_cache
from mmdiff_gen.train.feature_codec import decode, encode
from mmdiff_gen.train.trainer import TrainConfig, train_head

VARIANTS = [("int8", "token"), ("int8", "channel"), ("fp8", "token"), ("fp8", "channel")]
KEYS = {"seg": "miou", "saliency": "max_f", "depth": "abs_rel"}


class Recoded:
    """A cache whose features pass through one codec (encode, decode) as they are read."""

    def __init__(self, cache: FeatureCache, codec: str, per: str):
        self.cache, self.codec, self.per = cache, codec, per
        self.grid, self.image_size, self.spec = cache.grid, cache.image_size, cache.spec

    def batches(self, batch_size: int, **kw):
        for b in self.cache.batches(batch_size, **kw):
            x = b["features"]
            yield decode(b | encode(x, self.codec, self.per), x.dtype)


def feature_error(cache: FeatureCache, codec: str, per: str) -> float:
    """‖decoded − bf16‖ / ‖bf16‖ over every feature of the cache."""
    num = den = 0.0
    for b in cache.batches(64):
        x = b["features"].float()
        y = decode(encode(b["features"], codec, per), torch.float32)["features"]
        num, den = num + float(((y - x) ** 2).sum()), den + float((x**2).sum())
    return (num / den) ** 0.5


def shipped_heads(model: str) -> dict:
    if model != "toy":  # the smoke run's tiny random backbone has no heads of its own
        return {}
    return {t: load_head(Path(DEFAULT_HEADS["toy"]) / f"{t}.safetensors") for t in TASKS}


def score(heads: dict, cache) -> dict:
    """{task: its metric} of each shipped head on `cache`."""
    out = {}
    for task, (model, meta) in heads.items():
        steps = meta.timestep_indices(list(cache.spec.sigmas))
        out[task] = evaluate_head(model, meta.side, steps, cache, list(CLASSES))[task][KEYS[task]]
    return out


def measure(work: Path, model: str, n_train: int, n_val: int, epochs: int, batch: int, codec: str) -> dict:
    bb = load_backbone(model, dtype=torch.float32, device="cpu")
    spec = CaptureSpec.for_tasks(TASKS, store_device="cpu")
    caches: dict[str, dict[str, FeatureCache]] = {}
    for split, seed, n in (("train", TRAIN_SEED, n_train), ("val", VAL_SEED, n_val)):
        scenes = work / f"{split}_scenes"
        if not (scenes / "meta.jsonl").is_file():
            write_scenes(scenes, n, seed)
        for c in ("bf16", codec):
            caches.setdefault(c, {})[split] = FeatureCache(build_cache(
                bb, FilesDataset(scenes), spec, work / f"{split}_cache_{c}", batch_size=64, codec=c))
    val = caches["bf16"]["val"]
    heads = shipped_heads(model)
    res: dict = {"model": model, "train": n_train, "val": n_val, "epochs": epochs, "codec": codec,
                 "shipped_bf16": score(heads, val), "codecs": {}}
    for c, per in VARIANTS:
        res["codecs"][f"{c}/{per}"] = {"rel_l2": feature_error(val, c, per), "heads": score(heads, Recoded(val, c, per))}
    res["written"] = {"rel_l2": feature_error_between(val, caches[codec]["val"]),
                      "heads": score(heads, caches[codec]["val"])}
    res["bytes_per_sample"] = {c: caches[c]["val"].manifest["bytes_per_sample"] for c in caches}

    # Retrained on each cache, and an epoch from the bf16 cache, the 8-bit cache and no cache.
    cfg = TrainConfig(tasks=TASKS, epochs=epochs, batch_size=batch, lr=1e-3, head=TOY_HEAD)
    res["retrained"], res["epoch_s"] = {}, {}
    for c in ("bf16", codec):
        t0 = time.perf_counter()
        m = train_head(caches[c]["train"], cfg, work / f"heads_{c}" / "all.safetensors", classes=list(CLASSES),
                       eval_cache=caches[c]["val"], depth_unit="metre")
        res["retrained"][c] = {t: m[t][KEYS[t]] for t in TASKS} | {"seconds": time.perf_counter() - t0}
    one = TrainConfig(tasks=TASKS, epochs=1, batch_size=batch, lr=1e-3, head=TOY_HEAD)
    sources = {c: caches[c]["train"] for c in caches} | {"no cache": LiveFeatures(
        bb, FilesDataset(work / "train_scenes"), spec, source="train_scenes", extract_batch_size=batch)}
    for name, src in sources.items():
        t0 = time.perf_counter()
        train_head(src, one, work / "epoch" / f"{name.replace(' ', '_')}.safetensors", classes=list(CLASSES))
        res["epoch_s"][name] = time.perf_counter() - t0
    return res


def feature_error_between(ref: FeatureCache, other: FeatureCache) -> float:
    num = den = 0.0
    for a, b in zip(ref.batches(64), other.batches(64)):
        x, y = a["features"].float(), b["features"].float()
        num, den = num + float(((y - x) ** 2).sum()), den + float((x**2).sum())
    return (num / den) ** 0.5


def flux_geometry_bytes(work: Path, codec: str) -> dict:
    """Bytes per sample of caches of one 512² render extracted at FLUX.1-dev's geometry (module docstring, 4.)."""
    from PIL import Image

    from mmdiff_gen.backbones import wrap_pipeline
    from mmdiff_gen.backbones.tiny import build_tiny_flux
    from mmdiff_gen.io.readers import Sample
    from mmdiff_gen.toy.world import render_scene

    # 24 heads × 128 = 3 072 wide; a VAE of 4 stages downsamples 8× and FLUX packs 2 × 2 latents: 512² → 32 × 32.
    pipe = build_tiny_flux(dim_head=128, heads=24, double_blocks=1, single_blocks=4, vae_channels=(16, 32, 32, 32))
    bb = wrap_pipeline(pipe.to(torch.bfloat16), name="flux-dev-geometry")
    scene = render_scene(VAL_SEED)
    image = np.asarray(Image.fromarray(scene.image).resize((512, 512), Image.NEAREST))
    labels = {"seg": np.asarray(Image.fromarray(scene.seg).resize((512, 512), Image.NEAREST))}
    sample = Sample(key="0", image=image, caption=scene.caption, labels=labels)
    spec = CaptureSpec.for_tasks(["seg"], store_device="cpu")
    out = {}
    for c in ("bf16", codec):
        cache = FeatureCache(build_cache(bb, [sample], spec, work / f"flux_geometry_{c}", codec=c))
        shard = cache.root / "shard_00000.safetensors"
        out[c] = {"bytes_per_sample": cache.manifest["bytes_per_sample"], "shard_file_bytes": shard.stat().st_size,
                  "features_shape": list(next(cache.batches(1))["features"].shape[1:])}
    return out


def report(res: dict) -> str:
    lines = [f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
             f"torch {torch.__version__}; backbone {res['model']}, {res['train']} train / {res['val']} held-out "
             "renders", "",
             "| features | rel. L2 error | seg mIoU | saliency max F | depth AbsRel |", "|---|---|---|---|---|"]
    b = res["shipped_bf16"]
    if b:
        lines.append(f"| bf16 (as captured) | 0 | {b['seg']:.2f} | {b['saliency']:.4f} | {b['depth']:.4f} |")
    rows = list(res["codecs"].items()) + [(f"{res['codec']} cache as written", res["written"])]
    for name, r in rows:
        h = r["heads"]
        cells = " | ".join(f"{h[t]:.2f} ({h[t] - b[t]:+.2f})" if t == "seg" else f"{h[t]:.4f} ({h[t] - b[t]:+.4f})"
                           for t in TASKS) if h else "– | – | –"
        lines.append(f"| {name} | {r['rel_l2']:.4f} | {cells} |")
    lines += ["", f"retrained ({res['epochs']} epochs, one head for the three tasks):", ""]
    for c, r in res["retrained"].items():
        lines.append(f"- {c}: seg mIoU {r['seg']:.2f}, saliency max F {r['saliency']:.4f}, depth AbsRel "
                     f"{r['depth']:.4f} ({r['seconds']:.0f} s)")
    bps = res["bytes_per_sample"]
    lines += ["", "bytes per sample: " + ", ".join(f"{c} {v:,}" for c, v in bps.items()),
              "one epoch: " + ", ".join(f"{k} {v:.1f} s ({v / res['epoch_s']['bf16']:.2f}×)"
                                        for k, v in res["epoch_s"].items())]
    for c, g in res.get("flux_geometry", {}).items():
        lines.append(f"FLUX.1-dev geometry, one 512² image, {c}: features {g['features_shape']}, "
                     f"{g['bytes_per_sample'] / 2**20:.2f} MiB per sample ({g['shard_file_bytes']:,} bytes on disk)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny random backbone, 6 + 4 scenes: seconds")
    ap.add_argument("--work", default="out/bench_compact_cache", help="renders, caches and heads (resumable)")
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--val", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--codec", default="int8", help="the 8-bit codec whose caches are written and retrained on")
    ap.add_argument("--flux-geometry", action="store_true", help="also measure a cache at FLUX.1-dev's geometry")
    ap.add_argument("--only-flux-geometry", action="store_true", help="measure that alone")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)
    model = "toy"
    if args.smoke:
        model, args.train, args.val, args.epochs, args.batch = "tiny-random", 6, 4, 1, 3
    work = Path(args.work)
    if args.only_flux_geometry:
        res = {"flux_geometry": flux_geometry_bytes(work, args.codec)}
        print(json.dumps(res, indent=1))
    else:
        res = measure(work, model, args.train, args.val, args.epochs, args.batch, args.codec)
        if args.flux_geometry:
            res["flux_geometry"] = flux_geometry_bytes(work, args.codec)
        print(report(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
