"""A generated dataset as one self-contained HTML page: a grid of N samples with per-task overlays the viewer
toggles, the class legend, class frequencies, the quality histogram with its threshold, and the filtered and
failed samples.

Self-contained so that it opens from a bucket, a mail or an offline laptop: images are data URIs, the script and
styles are inline, nothing is fetched. The page stays small for any dataset size: N thumbnails, and statistics
(io/summary.py) from one pass over the whole dataset. The page's script builds the DOM from one JSON object
(`<script id="data">`), so what a browser shows can be checked on the DOM it built.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from .._atomic import atomic_path
from ..tasks import get as get_task
from .dataset import GeneratedDataset, GeneratedSample
from .preview import colorize_depth, seg_layer, task_classes, task_unit, unit_suffix
from .store import Store
from .summary import spread, summarize

THUMB = 192  # longest side of a thumbnail, pixels
MAX_ROWS = 1000  # rows of the filtered / failed table; the rest are counted, and listed in the shards' stats
COLOUR_BAR = (256, 12)  # (width, height) of a positive task's colour bar image
# The browser may load nothing but the page's own data URIs, inline styles and inline script.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


def _data_uri(array: np.ndarray, fmt: str) -> str:
    """(H, W), (H, W, 3) or (H, W, 4) uint8 → a data: URI (JPEG for photos and smooth maps, PNG for the rest)."""
    buf = io.BytesIO()
    if fmt == "jpeg":
        Image.fromarray(array).save(buf, format="JPEG", quality=85)
    else:
        Image.fromarray(array).save(buf, format="PNG", optimize=True)
    return f"data:image/{fmt};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _thumb_size(h: int, w: int, side: int) -> tuple[int, int]:
    scale = min(1.0, side / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def _nearest(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) label map of any dtype resampled to `size` (h, w) by nearest neighbour (ids must not blend)."""
    h, w = label.shape
    rows = (np.arange(size[0]) + 0.5) * h / size[0]
    cols = (np.arange(size[1]) + 0.5) * w / size[1]
    return label[np.ix_(rows.astype(int), cols.astype(int))]


def _shrink(sample: GeneratedSample, side: int) -> dict:
    """One sample's image (bilinear) and labels (nearest) at thumbnail size, still as arrays: the colours of
    positive tasks wait for the whole dataset's range."""
    size = _thumb_size(*sample.image.shape[:2], side)
    image = np.asarray(Image.fromarray(sample.image).resize(size[::-1], Image.BILINEAR))
    return {"key": sample.key, "prompt": sample.prompt, "quality": (sample.meta.get("quality") or {}).get("score"),
            "image": image, "labels": {t: _nearest(lab, size) for t, lab in sample.labels.items()}}


def _layer(task: str, label: np.ndarray, info: dict, value_range: tuple[float, float] | None) -> str:
    """A task's thumbnail layer as a data URI: class colours over transparency (composited over the image by the
    browser), saliency as grey, positive values on the depth ramp over `value_range`."""
    kind = get_task(task).kind
    if kind == "classes":
        return _data_uri(seg_layer(label, task_classes(info, task)[1]), "png")
    if kind == "probability":
        return _data_uri(label, "png")
    return _data_uri(colorize_depth(label, *(value_range or (None, None))), "jpeg")


def _colour_bar(lo: float, hi: float) -> str:
    """The depth ramp over [lo, hi], near (lo) on the left, as a data URI."""
    w, h = COLOUR_BAR
    return _data_uri(colorize_depth(np.linspace(lo, hi, w)[None].repeat(h, 0), lo, hi), "png")


def write_report(root: "Path | str | Store", out: "Path | str", n: int = 48, side: int = THUMB) -> dict:
    """Write the report page of a generated dataset (a folder or a URL; an incomplete one says what it misses).

    Args:
        root: the dataset.
        out: the HTML file to write (replaced whole).
        n: thumbnails, evenly spread over the written samples in key order (the same ones on every run).
        side: a thumbnail's longest side in pixels.
    Returns:
        what it wrote: path, bytes, thumbnails, samples (written, in the dataset), tasks, classes (legend
        entries), rejected (filtered and failed samples) and rejected_rows (of them, rows in the table).
    """
    if n < 1:
        raise ValueError(f"n must be ≥ 1, got {n}")
    ds = GeneratedDataset(root, allow_partial=True)
    picks = set(spread(len(ds), n))
    shrunk = []

    def take(i: int, sample: GeneratedSample) -> None:
        if i in picks:
            shrunk.append(_shrink(sample, side))

    summary = summarize(ds, visit=take)
    ranges = {t: (v["min"], v["max"]) for t, v in summary["values"].items() if v["min"] is not None}
    thumbs = [{"key": s["key"], "prompt": s["prompt"], "quality": s["quality"],
               "image": _data_uri(s["image"], "jpeg"),
               "layers": {t: _layer(t, lab, ds.info, ranges.get(t)) for t, lab in s["labels"].items()}}
              for s in shrunk]
    legend = {t: [c for c in rows if c["id"] != 0 and c["pixels"]] for t, rows in summary["classes"].items()}
    rejected = summary.pop("rejected")
    data = {
        "title": f"{Path(str(summary['location'])).name or summary['location']} — mmdiff-gen dataset",
        "summary": summary,
        "thumbnails": thumbs,
        "tasks": [{"name": t, "kind": get_task(t).kind} for t in ds.tasks],
        "legend": legend,
        "colour_bars": {t: {"uri": _colour_bar(lo, hi), "lo": lo, "hi": hi,
                            "unit": unit_suffix(task_unit(ds.info, t)).strip()} for t, (lo, hi) in ranges.items()},
        "rejected": rejected[:MAX_ROWS],
        "rejected_total": len(rejected),
    }
    blob = json.dumps(data, ensure_ascii=False).replace("<", "\\u003c")  # a prompt's "</script>" must not end it
    page = _PAGE.replace("__CSP__", CSP).replace("__DATA__", blob)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return {"path": str(out), "bytes": out.stat().st_size, "thumbnails": len(thumbs),
            "samples": summary["samples"]["written"], "tasks": list(ds.tasks),
            "classes": sum(len(v) for v in legend.values()), "rejected": len(rejected),
            "rejected_rows": len(data["rejected"])}


# The page: styles, an empty body and a script that builds everything from the data block.
_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="__CSP__">
<title>mmdiff-gen dataset report</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 16px 24px; color: #111; background: #fff; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 20px 0 6px; }
.problems { color: #a00; } .muted { color: #666; }
.controls label { margin-right: 14px; white-space: nowrap; }
.legend { display: flex; flex-wrap: wrap; gap: 4px 14px; margin: 6px 0; }
.legend-entry { display: inline-flex; align-items: center; gap: 5px; }
.swatch { display: inline-block; width: 16px; height: 16px; border: 1px solid #999; }
.charts { display: flex; flex-wrap: wrap; gap: 32px; align-items: flex-start; }
.charts > div { max-width: 560px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(200px, 1fr)); gap: 10px; }
.sample { margin: 0; } .sample figcaption { font-size: 12px; overflow: hidden; text-overflow: ellipsis;
  white-space: nowrap; }
.stack { position: relative; line-height: 0; }
.stack img { width: 100%; image-rendering: pixelated; }
.stack img.layer { position: absolute; left: 0; top: 0; height: 100%; }
table { border-collapse: collapse; font-size: 13px; } td, th { border: 1px solid #ccc; padding: 2px 6px;
  text-align: left; vertical-align: top; }
svg text { font: 11px system-ui, sans-serif; }
</style>
</head>
<body>
<noscript>This report draws itself with an inline script; allow scripts for this file to see it.</noscript>
<script id="data" type="application/json">__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const S = D.summary;
const NS = "http://www.w3.org/2000/svg";
function el(tag, attrs, ...kids) {
  const e = tag.startsWith("svg:") ? document.createElementNS(NS, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const k of kids) e.append(k);
  return e;
}
const rgb = c => `rgb(${c[0]},${c[1]},${c[2]})`;
const fmt = (x, d) => x === null || x === undefined ? "–" : Number(x).toFixed(d);
const plural = (n, w) => `${n} ${w}${n === 1 ? "" : "s"}`;
const bytes = n => n < 1024 ? `${n} B` : n < 1048576 ? `${(n / 1024).toFixed(1)} KiB` :
  n < 1073741824 ? `${(n / 1048576).toFixed(1)} MiB` : `${(n / 1073741824).toFixed(2)} GiB`;
document.title = D.title;
const body = document.body;

// Header: what the dataset is, and whether it is whole.
body.append(el("h1", {}, D.title));
const sm = S.samples, sh = S.shards;
body.append(el("div", {id: "overview"},
  `${plural(sm.written, "sample")} written of ${sm.planned} planned (${sm.filtered} filtered, ${sm.failed} failed), ` +
  `${sh.whole} of ${plural(sh.planned, "shard")} whole, ${bytes(S.bytes)}; ` +
  `tasks ${D.tasks.map(t => t.name).join(", ")}; ${S.image.width}×${S.image.height} ${S.image.format}; ` +
  `backbone ${S.backbone.name || "?"} (${S.backbone.family || "?"})`));
if (!S.whole) body.append(el("div", {class: "problems", id: "problems"}, "Not whole: " + S.problems));

// Toggles: one checkbox per task layer; class overlays start on.
const controls = el("div", {class: "controls", id: "controls"}, "Show: ");
for (const t of D.tasks) {
  const box = el("input", {type: "checkbox", id: "toggle-" + t.name, "data-task": t.name});
  box.checked = t.kind === "classes";
  box.addEventListener("change", () => show(t.name, box.checked));
  controls.append(el("label", {}, box, " " + t.name));
}
body.append(controls);

// Legend: the classes that occur, palette colour and name, per class task.
for (const [task, rows] of Object.entries(D.legend)) {
  const legend = el("div", {class: "legend", "data-task": task}, el("b", {}, task + ":"));
  for (const c of rows)
    legend.append(el("span", {class: "legend-entry", "data-class": c.name},
                     el("span", {class: "swatch", style: "background:" + rgb(c.colour)}), c.name));
  body.append(legend);
}
for (const [task, bar] of Object.entries(D.colour_bars)) {
  const unit = bar.unit ? " " + bar.unit : "";
  body.append(el("div", {class: "colour-bar", "data-task": task},
    el("b", {}, `${task}${bar.unit ? " (" + bar.unit + ")" : " (relative)"}: `), `${fmt(bar.lo, 2)}${unit} `,
    el("img", {src: bar.uri, alt: task + " colour bar", style: "vertical-align: middle"}),
    ` ${fmt(bar.hi, 2)}${unit} (near = bright)`));
}

// Charts: class frequencies (share of labelled pixels; images and instances in the labels) and quality scores.
const charts = el("div", {class: "charts"});
for (const [task, rows] of Object.entries(S.classes)) {
  const shown = rows.filter(c => c.pixels > 0);
  const W = 520, rowH = 18, left = 110, H = shown.length * rowH + 24;
  const top = Math.max(...shown.map(c => c.share), 1e-9);
  const svg = el("svg:svg", {width: W, height: H, class: "class-histogram", "data-task": task});
  shown.forEach((c, i) => {
    const y = i * rowH + 4, w = Math.max(1, (W - left - 190) * c.share / top);
    svg.append(el("svg:text", {x: left - 6, y: y + 12, "text-anchor": "end"}, c.name));
    svg.append(el("svg:rect", {x: left, y, width: w, height: rowH - 4, fill: rgb(c.colour), stroke: "#888",
                               class: "class-bar", "data-class": c.name}));
    svg.append(el("svg:text", {x: left + w + 6, y: y + 12},
      `${(100 * c.share).toFixed(1)} % px, ${plural(c.images, "image")}` +
      (c.instances === null ? "" : `, ${c.instances} inst.`)));
  });
  charts.append(el("div", {}, el("h2", {}, `${task}: classes`), svg));
}
const Q = S.quality;
const qbox = el("div", {id: "quality"}, el("h2", {}, "Quality scores"));
if (Q.histogram) {
  const W = 420, H = 180, pad = 28, e = Q.histogram.edges, c = Q.histogram.counts;
  const lo = e[0], hi = e[e.length - 1], top = Math.max(...c, 1);
  const x = v => pad + (W - 2 * pad) * (v - lo) / (hi - lo);
  const svg = el("svg:svg", {width: W, height: H, class: "quality-histogram"});
  c.forEach((n, i) => {
    const h = (H - 2 * pad) * n / top;
    svg.append(el("svg:rect", {x: x(e[i]), y: H - pad - h, width: Math.max(1, x(e[i + 1]) - x(e[i]) - 1), height: h,
                               fill: "#4878a8", class: "quality-bar", "data-count": n}));
  });
  svg.append(el("svg:line", {x1: pad, x2: W - pad, y1: H - pad, y2: H - pad, stroke: "#333"}));
  svg.append(el("svg:text", {x: pad, y: H - 10, "text-anchor": "middle"}, fmt(lo, 3)));
  svg.append(el("svg:text", {x: W - pad, y: H - 10, "text-anchor": "middle"}, fmt(hi, 3)));
  svg.append(el("svg:text", {x: 4, y: pad - 6}, `${top} max/bin`));
  if (Q.min_quality !== null) {
    svg.append(el("svg:line", {id: "threshold", x1: x(Q.min_quality), x2: x(Q.min_quality), y1: pad - 8,
                               y2: H - pad, stroke: "#d00", "stroke-width": 2, "stroke-dasharray": "4 3"}));
    svg.append(el("svg:text", {x: x(Q.min_quality) + 4, y: pad, fill: "#d00"}, `min_quality ${Q.min_quality}`));
  }
  qbox.append(svg);
}
qbox.append(el("div", {class: "muted"},
  `${Q.scored} scored: min ${fmt(Q.min, 3)}, quartiles ${fmt(Q.q1, 3)} / ${fmt(Q.median, 3)} / ${fmt(Q.q3, 3)}, ` +
  `max ${fmt(Q.max, 3)}; ${Q.filtered} filtered, ${Q.failed} failed` +
  (Q.min_quality === null ? "; no min_quality" : `; min_quality ${Q.min_quality}`)));
charts.append(qbox);
body.append(charts);

// The grid: the image, and one stacked layer per task, shown by its toggle.
body.append(el("h2", {}, `${plural(D.thumbnails.length, "sample")} of ${sm.written}, evenly spread`));
const grid = el("div", {class: "grid", id: "grid"});
for (const s of D.thumbnails) {
  const stack = el("div", {class: "stack"}, el("img", {class: "image", src: s.image, alt: s.key}));
  for (const t of D.tasks)
    stack.append(el("img", {class: "layer layer-" + t.name, "data-task": t.name, src: s.layers[t.name],
                            alt: `${s.key} ${t.name}`}));
  const q = s.quality === null || s.quality === undefined ? "" : ` · q ${fmt(s.quality, 3)}`;
  grid.append(el("figure", {class: "sample", "data-key": s.key, title: `${s.key}: ${s.prompt}${q}`},
                 stack, el("figcaption", {}, `${s.key}${q} · ${s.prompt}`)));
}
body.append(grid);
function show(task, on) {
  for (const img of grid.querySelectorAll(`img.layer[data-task="${task}"]`)) img.style.display = on ? "" : "none";
}
for (const box of controls.querySelectorAll("input")) show(box.dataset.task, box.checked);

// Filtered and failed samples, from the shards' stats.
body.append(el("h2", {}, `Filtered and failed samples (${D.rejected_total})`));
if (D.rejected.length) {
  const table = el("table", {id: "rejected"},
    el("tr", {}, ...["key", "prompt", "status", "error / quality"].map(h => el("th", {}, h))));
  for (const r of D.rejected) {
    const prompt = r.prompt !== null ? r.prompt : `prompt #${r.prompt_index} (no sample of it was written)`;
    const why = r.status === "error" ? r.error : `quality ${fmt(r.quality, 3)}`;
    table.append(el("tr", {class: "rejected-row", "data-status": r.status},
      ...[r.key, prompt, r.status, why].map(v => el("td", {}, String(v)))));
  }
  body.append(table);
  if (D.rejected_total > D.rejected.length)
    body.append(el("div", {class: "muted"}, `… and ${D.rejected_total - D.rejected.length} more: see the shards' ` +
                                            "*_stats.json"));
} else body.append(el("div", {class: "muted"}, "none"));
body.dataset.ready = "1";
</script>
</body>
</html>
"""
