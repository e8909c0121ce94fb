"""The paper's ablation (Table 5) on the toy world: every row × task at two budgets and several seeds, and where
multi-timestep fusion helps or hurts — per class, on object boundaries vs interiors, and the mixing weights α.

Rows are trained with the same data, budget and seeds; the second budget continues the first run (the
trainer's rate is constant, so a head at budget 1 is the same run's state at that epoch). One JSON file per
(row, task, seed, budget) under WORK/ablation/results/: a killed run resumes at the first missing one.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from .._atomic import atomic_path
from ..heads.aggregation import TokenAggregation
from ..heads.checkpoint import load_head
from ..heads.model import predictions
from ..train.feature_cache import FeatureCache
from ..train.metrics import DepthMetrics, SegMetrics
from ..heads.inputs import run_head
from ..train.trainer import TrainConfig, train_head
from .data import boundary_mask
from .heads_recipe import TASKS, TOY_HEAD, toy_caches
from .world import CLASSES

# MMDiff Table 5, on the toy world: row → (the blocks its features come from, its TrainConfig fields).
# Sigma index 3 is t = 0.001 (capture orders sigmas noisiest first).
ABLATIONS: dict[str, tuple[str, dict]] = {
    "double-stream, t ≈ 0 only": ("joint", dict(timesteps=(3,), side="none")),
    "single-stream, t ≈ 0 only": ("feature", dict(timesteps=(3,), side="none")),
    "+ averaged cross-attention (t ≈ 0)": ("feature", dict(timesteps=(3,), side="cross")),
    "+ concept attention (t ≈ 0)": ("feature", dict(timesteps=(3,), side="concepts")),
    "multi-timestep + concept attention": ("feature", dict(side="concepts")),
    "multi-timestep (plain mean) + concept attention": ("feature", dict(side="concepts", fusion="mean")),
}
BOUNDARY_RADIUS = 2  # pixels within 2 px of a class change are "boundary" (a token is 8 px wide)


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name)[:40]


@torch.no_grad()
def analyse(head: Path, cfg: TrainConfig, val: FeatureCache) -> dict:
    """A trained head on the validation cache, split by region, and its mixing weights.

    Regions: boundary pixels (within BOUNDARY_RADIUS of a change of ground-truth class) and interior pixels;
    seg mIoU, saliency MAE, depth AbsRel and δ1 in each. For learned fusion, α per layer and timestep (the
    softmax over t of eq. 2), averaged over all tokens, boundary tokens (a boundary pixel in the 8×8 patch) and
    interior tokens.
    """
    model, _ = load_head(head)
    grid, size = val.grid, val.image_size
    task, = cfg.tasks
    regions = {"boundary": {}, "interior": {}}
    for r in regions.values():
        r["acc"] = SegMetrics(len(CLASSES)) if task == "seg" else DepthMetrics() if task == "depth" else [0.0, 0]
    alpha = {}  # layer → {"all" | "boundary" | "interior": [sum over tokens of (T,), token count]}
    for batch in val.batches(32):
        pred = predictions(task, run_head(model, cfg.side, batch, grid, size, timesteps=cfg.timesteps)[task]).numpy()
        gt, seg = batch[task].numpy(), batch["seg"].numpy()
        edge = boundary_mask(seg, BOUNDARY_RADIUS)
        for name, mask in (("boundary", edge), ("interior", ~edge)):
            acc = regions[name]["acc"]
            if task == "seg":
                acc.update(pred, np.where(mask, gt, 255))
            elif task == "depth":
                acc.update(pred, np.where(mask, gt, 0))
            else:
                acc[0] += float(np.abs(pred.astype(np.float64) - gt)[mask].sum() / 255)
                acc[1] += int(mask.sum())
        h, w = grid
        p = seg.shape[1] // h
        token_edge = torch.from_numpy(boundary_mask(seg, 1).reshape(-1, h, p, w, p).any((2, 4)))  # (B, h, w)
        for i, agg in enumerate(model.aggregators):
            if not isinstance(agg, TokenAggregation):
                continue
            a = agg.last_weights.double()  # (B, T, h, w)
            for name, m in (("all", torch.ones_like(token_edge)), ("boundary", token_edge), ("interior", ~token_edge)):
                s = alpha.setdefault(str(i), {}).setdefault(name, [torch.zeros(a.shape[1], dtype=torch.float64), 0])
                s[0] += (a * m[:, None]).sum((0, 2, 3))
                s[1] += int(m.sum())
    out = {}
    for name, r in regions.items():
        acc = r["acc"]
        if task == "seg":
            out[name] = {"miou": acc.result()["miou"]}
        elif task == "depth":
            res = acc.result()
            out[name] = {"abs_rel": res["abs_rel"], "d1": res["d1"]}
        else:
            out[name] = {"mae": acc[0] / max(acc[1], 1)}
    result = {"regions": out}
    if alpha:
        result["alpha"] = {layer: {k: (v[0] / max(v[1], 1)).tolist() for k, v in d.items()} for layer, d in alpha.items()}
    return result


def run_ablation(work: Path, *, train_scenes: int = 1000, val_scenes: int = 500, budgets: tuple[int, ...] = (4, 12),
                 seeds: tuple[int, ...] = (0, 1, 2), tasks: tuple[str, ...] = TASKS, rows: tuple[str, ...] | None = None,
                 model: str = "toy") -> dict:
    """Every row × task × seed at each budget (epochs; later budgets continue earlier ones); returns the summary
    (also WORK/ablation/summary.json). Budgets run outermost, so a complete first-budget table comes first."""
    budgets = tuple(sorted(set(budgets)))
    rows = tuple(ABLATIONS) if rows is None else rows
    unknown = [r for r in rows if r not in ABLATIONS]
    if unknown or not budgets or budgets[0] < 1 or not seeds:
        raise ValueError(f"unknown rows {unknown}" if unknown else "budgets must be ≥ 1 epoch and seeds non-empty")
    work = Path(work)
    caches = toy_caches(work, train_scenes, val_scenes, model, blocks=tuple(dict.fromkeys(ABLATIONS[r][0] for r in rows)))
    folder = work / "ablation"
    for epochs in budgets:
        for seed in seeds:
            for name in rows:
                blocks, kw = ABLATIONS[name]
                train, val = caches[blocks]
                for task in tasks:
                    entry = folder / "results" / f"{_slug(name)}_{task}_s{seed}_e{epochs}.json"
                    if entry.is_file():
                        continue
                    cfg = replace(TrainConfig(tasks=task, epochs=epochs, batch_size=32, lr=1e-3, head=TOY_HEAD,
                                              seed=seed), **kw)
                    head = folder / f"{_slug(name)}_{task}_s{seed}.safetensors"
                    t0 = time.time()
                    metrics = train_head(train, cfg, head, classes=list(CLASSES), eval_cache=val)
                    record = {"row": name, "task": task, "seed": seed, "epochs": epochs,
                              "steps": epochs * train.num_batches(32), "seconds": round(time.time() - t0, 1),
                              "config": asdict(cfg), "metrics": metrics}
                    if epochs == budgets[-1]:
                        record |= analyse(head, cfg, val)
                    entry.parent.mkdir(parents=True, exist_ok=True)
                    with atomic_path(entry) as tmp:
                        Path(tmp).write_text(json.dumps(record, indent=1))
    summary = summarise(folder / "results")
    with atomic_path(folder / "summary.json") as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=1))
    return summary


KEY_METRICS = {"seg": ("miou",), "saliency": ("s_measure", "max_f", "mae"), "depth": ("abs_rel", "rmse", "d1")}


def _stats(values: list[float]) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": len(v)}


def summarise(results: Path) -> dict:
    """Mean ± std over seeds of every (row, task, budget) in a results folder: the key metrics, per-class IoU,
    the regions and α (where recorded)."""
    groups: dict[tuple, list[dict]] = {}
    for f in sorted(Path(results).glob("*.json")):
        r = json.loads(f.read_text())
        groups.setdefault((r["row"], r["task"], r["epochs"]), []).append(r)
    summary: dict = {}
    for (row, task, epochs), rs in groups.items():
        s = {"steps": rs[0]["steps"], "seeds": sorted(r["seed"] for r in rs),
             "seconds": _stats([r["seconds"] for r in rs])["mean"]}
        s |= {k: _stats([r["metrics"][k] for r in rs]) for k in KEY_METRICS[task]}
        if task == "seg":
            s["iou"] = {c: _stats([r["metrics"]["iou"][i] for r in rs])["mean"] for i, c in enumerate(CLASSES)
                        if all(r["metrics"]["iou"][i] is not None for r in rs)}
        if all("regions" in r for r in rs):
            s["regions"] = {reg: {k: _stats([r["regions"][reg][k] for r in rs]) for k in rs[0]["regions"][reg]}
                            for reg in rs[0]["regions"]}
        if all("alpha" in r for r in rs):
            s["alpha"] = {layer: {k: np.mean([r["alpha"][layer][k] for r in rs], 0).tolist()
                                  for k in rs[0]["alpha"][layer]} for layer in rs[0]["alpha"]}
        summary.setdefault(row, {}).setdefault(task, {})[str(epochs)] = s
    return summary
