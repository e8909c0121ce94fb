"""Do the shipped toy heads label the same things when the transformer's weights are stored in fp8 or int8?

One command, one run:

    python bench/storage_agreement.py [--n 64] [--batch 16] [--json out.json]
    python bench/storage_agreement.py --smoke     # 2 prompts, 4 steps: seconds

The same fresh toy captions and seeds are generated three times, with the transformer's weights stored in full
precision (float32), in fp8 (diffusers layerwise casting: float8_e4m3fn storage, float32 compute) and in int8
(torchao int8 weight-only quantization); the text encoders and the VAE stay in float32. Each reduced run is
compared with the full-precision run: segmentation pixel agreement (and mIoU of one against the other),
saliency MAE (0–1), depth AbsRel, and the PSNR of the uint8 images a dataset would store. The time of each
generation pass is reported too, as a ratio (one pass each, on a shared CPU: rough).
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
from mmdiff_gen.capture import generate
from mmdiff_gen.jobs.annotate import Annotator, head_files
from mmdiff_gen.toy.world import CLASSES, render_scene
from mmdiff_gen.train.metrics import DepthMetrics, SegMetrics

TASKS = ["seg", "saliency", "depth"]
STORAGES = ("full", "fp8", "int8")
CAPTION_SEED = 7_600_000  # fresh caption scenes: far from every training, held-out and evaluation seed range


def captions(n: int) -> list[str]:
    return [render_scene(CAPTION_SEED + i).caption for i in range(n)]


@torch.no_grad()
def labels_of(storage: str, texts: list[str], batch: int, kw: dict) -> dict:
    """Images (N, H, W, 3) uint8 and the heads' label maps of one storage variant, with its generation time."""
    bb = load_backbone("toy", dtype=torch.float32, device="cpu", storage=storage)
    ann = Annotator(head_files(Path(DEFAULT_HEADS["toy"]), TASKS), bb.identity())
    size = (kw["height"], kw["width"])
    images, labels, seconds = [], {t: [] for t in TASKS}, 0.0
    for i in range(0, len(texts), batch):
        chunk = texts[i : i + batch]
        t0 = time.perf_counter()
        gen = generate(bb, chunk, ann.spec(), seeds=[CAPTION_SEED + j for j in range(i, i + len(chunk))],
                       output_type="np", **kw)
        seconds += time.perf_counter() - t0
        images.append((gen.images * 255).round().astype(np.uint8))  # (B, H, W, 3), what a dataset stores
        for t, v in ann(gen.capture, size).labels.items():
            labels[t].append(v.numpy())
    return {"images": np.concatenate(images), "seconds": seconds,
            **{t: np.concatenate(v) for t, v in labels.items()}}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def agreement(ref: dict, ours: dict) -> dict:
    seg = SegMetrics(len(CLASSES))
    depth = DepthMetrics()
    for p, g in zip(ours["seg"], ref["seg"]):
        seg.update(p, g)
    for p, g in zip(ours["depth"], ref["depth"]):
        depth.update(p, g)
    return {
        "seg_pixel_agreement": float((ours["seg"] == ref["seg"]).mean()),
        "seg_miou_vs_full": seg.result()["miou"],
        "saliency_mae": float(np.abs(ours["saliency"].astype(np.float64) - ref["saliency"]).mean() / 255),
        "depth_abs_rel": depth.result()["abs_rel"],
        "image_psnr_db": psnr(ours["images"], ref["images"]),
        "image_max_abs_diff": int(np.abs(ours["images"].astype(np.int16) - ref["images"]).max()),
        "time_ratio": ours["seconds"] / ref["seconds"],
    }


def measure(n: int, batch: int, steps: int | None) -> dict:
    texts = captions(n)
    kw = load_backbone("toy", dtype=torch.float32, device="cpu").sampling_kwargs(num_inference_steps=steps)
    runs = {s: labels_of(s, texts, batch, kw) for s in STORAGES}
    return {"n": n, "batch": batch, "sampling": kw, "seconds": {s: r["seconds"] for s, r in runs.items()},
            "vs_full": {s: agreement(runs["full"], runs[s]) for s in STORAGES if s != "full"}}


def report(res: dict) -> str:
    kw = res["sampling"]
    lines = [(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
              f"torch {torch.__version__}; toy backbone + shipped heads, {res['n']} fresh captions, "
              f"batch {res['batch']}, {kw['height']}×{kw['width']}, {kw['num_inference_steps']} steps, "
              f"true CFG {kw['true_cfg_scale']}"),
             "",
             ("| transformer storage vs full (float32) | seg pixel agreement | seg mIoU vs full | saliency MAE | "
              "depth AbsRel | image PSNR | image max abs diff (0–255) | generation time × full |"),
             "|---|---|---|---|---|---|---|---|"]
    names = {"fp8": "fp8 (layerwise casting, e4m3 storage, float32 compute)", "int8": "int8 weight-only (torchao)"}
    for s, a in res["vs_full"].items():
        lines.append(f"| {names[s]} | {a['seg_pixel_agreement'] * 100:.2f}% | {a['seg_miou_vs_full']:.1f} | "
                     f"{a['saliency_mae']:.4f} | {a['depth_abs_rel']:.4f} | {a['image_psnr_db']:.1f} dB | "
                     f"{a['image_max_abs_diff']} | {a['time_ratio']:.2f} |")
    lines.append(f"\nfull-precision generation: {res['seconds']['full']:.1f} s for {res['n']} images")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="2 prompts, 4 steps: seconds")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, help="sampling steps (default: the toy's own)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)
    if args.smoke:
        args.n, args.batch, args.steps = 2, 2, 4
    res = measure(args.n, args.batch, args.steps)
    print(report(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
