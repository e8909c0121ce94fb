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
3. Disk per sample of each cache as written, and the cost of a training step of the same head when its batch is
   read from the bf16 cache, from the 8-bit cache, or extracted with no cache (`train --no-cache`).
4. The bytes on disk of one 512² FLUX.1-dev sample as a bf16 and an 8-bit cache store it: the tensors a shard holds
   per sample at FLUX.1-dev's shapes (4 layers × 4 sigmas × 1 024 tokens × 3 072 channels, the segmentation concept
   maps and labels), written as a shard is (a cache's bytes depend on its shapes only, not on the values).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

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
from mmdiff_gen.heads.inputs import run_head
from mmdiff_gen.tasks import get as get_task
from mmdiff_gen.train.losses import LOSSES
from mmdiff_gen.train.trainer import TrainConfig, build_head, train_head

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
    res: dict = {"model": model, "train": n_train, "val": n_val, "epochs": epochs, "batch": batch, "codec": codec,
                 "shipped_bf16": score(heads, val), "codecs": {}}
    for c, per in VARIANTS:
        res["codecs"][f"{c}/{per}"] = {"rel_l2": feature_error(val, c, per), "heads": score(heads, Recoded(val, c, per))}
    res["written"] = {"rel_l2": feature_error_between(val, caches[codec]["val"]),
                      "heads": score(heads, caches[codec]["val"])}
    res["bytes_per_sample"] = {c: caches[c]["val"].manifest["bytes_per_sample"] for c in caches}

    # Retrained on each cache, and an epoch from the bf16 cache, the 8-bit cache and no cache.
    cfg = TrainConfig(tasks=TASKS, epochs=epochs, batch_size=batch, lr=1e-3, head=TOY_HEAD)
    res["retrained"] = {}
    for c in ("bf16", codec):
        m = train_head(caches[c]["train"], cfg, work / f"heads_{c}" / "all.safetensors", classes=list(CLASSES),
                       eval_cache=caches[c]["val"], depth_unit="metre")
        res["retrained"][c] = {t: m[t][KEYS[t]] for t in TASKS}
    sources = {c: caches[c]["train"] for c in caches} | {"no cache": LiveFeatures(
        bb, FilesDataset(work / "train_scenes"), spec, source="train_scenes", extract_batch_size=batch)}
    res["step_s"] = step_seconds(sources, cfg)
    return res


def step_seconds(sources: dict, cfg: TrainConfig, batches: int = 8, rounds: int = 3) -> dict:
    """Seconds per training step on each source: producing a batch (reading and decoding a cache's rows, or
    extracting them) plus the head's step (forward, backward, AdamW: the same on every source). The sources take
    turns, `batches` batches each per round, and each time is the minimum over `rounds`: load from other processes
    hits every source alike."""
    data = {name: float("inf") for name in sources}
    for _ in range(rounds):
        for name, src in sources.items():
            it = src.batches(cfg.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
            for _ in range(min(batches, src.num_batches(cfg.batch_size))):
                t0 = time.perf_counter()
                batch = next(it)
                data[name] = min(data[name], time.perf_counter() - t0)
    src = next(iter(sources.values()))
    model = build_head(src, cfg, len(CLASSES))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    step = float("inf")
    for _ in range(rounds * batches):
        t0 = time.perf_counter()
        pred = run_head(model, cfg.side, batch, src.grid, src.image_size)
        loss = sum(LOSSES[get_task(t).kind](pred[t].float(), batch[t]) for t in cfg.tasks)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step = min(step, time.perf_counter() - t0)
    return {"head_step": step, "data": data, "total": {k: v + step for k, v in data.items()}}


def feature_error_between(ref: FeatureCache, other: FeatureCache) -> float:
    num = den = 0.0
    for a, b in zip(ref.batches(64), other.batches(64)):
        x, y = a["features"].float(), b["features"].float()
        num, den = num + float(((y - x) ** 2).sum()), den + float((x**2).sum())
    return (num / den) ** 0.5


def flux_geometry_bytes(work: Path, codec: str) -> dict:
    """Bytes on disk of one 512² FLUX.1-dev sample as a cache shard holds it (module docstring, 4.): the tensors
    `feature_cache.extract_batch` stores, at FLUX.1-dev's shapes, written by the same safetensors call."""
    from safetensors.torch import save_file

    from mmdiff_gen.tasks import get as get_task

    l, t, n, c = 4, 4, 32 * 32, 3072  # the paper's layers × sigmas, 512² / 16 px per token, FLUX.1-dev's width
    k = len(get_task("seg").concepts)
    features = torch.randn(1, l, t, n, c).to(torch.bfloat16)  # values do not change the bytes
    rest = {"concept_maps": torch.rand(1, t, k, n), "seg": torch.zeros(1, 512, 512, dtype=torch.uint8),
            "index": torch.zeros(1, dtype=torch.int64)}
    work.mkdir(parents=True, exist_ok=True)
    out = {}
    for cd in ("bf16", codec):
        path = work / f"flux_sample_{cd}.safetensors"
        save_file(encode(features, cd) | rest, str(path))
        out[cd] = {"file_bytes": path.stat().st_size, "features_shape": [l, t, n, c]}
        path.unlink()
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
                     f"{r['depth']:.4f}")
    bps = res["bytes_per_sample"]
    st = res["step_s"]
    lines += ["", "bytes per sample: " + ", ".join(f"{c} {v:,}" for c, v in bps.items()),
              f"a training step (batch {res['batch']}): head {st['head_step'] * 1000:.0f} ms + producing the batch: "
              + ", ".join(f"{k} {v * 1000:.1f} ms (step {st['total'][k] / st['total']['bf16']:.2f}× bf16's)"
                          for k, v in st["data"].items())]
    for c, g in res["flux_geometry"].items():
        lines.append(f"one 512² FLUX.1-dev sample ({c}, features {g['features_shape']}): {g['file_bytes']:,} bytes "
                     f"= {g['file_bytes'] / 2**20:.2f} MiB")
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
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)
    model = "toy"
    if args.smoke:
        model, args.train, args.val, args.epochs, args.batch = "tiny-random", 6, 4, 1, 3
    work = Path(args.work)
    res = measure(work, model, args.train, args.val, args.epochs, args.batch, args.codec)
    res["flux_geometry"] = flux_geometry_bytes(work, args.codec)
    print(report(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
