"""`info`, `report`: what a generated dataset holds, as text / JSON and as one self-contained HTML page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._errors import clean_errors, err, fail

Dataset = Annotated[str, typer.Argument(help="A `generate` output folder or URL (s3://…, gs://…).")]


def info(
    src: Dataset,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Summarise a generated dataset: samples, shards (and what is not whole), classes with pixel / image / instance
    counts, quality scores, backbone, heads, image size, sampling settings, size on disk."""
    from ..io.summary import summarize

    with clean_errors():
        summary = summarize(src)
    if as_json:
        import json

        typer.echo(json.dumps(summary, indent=1, ensure_ascii=False))
    else:
        typer.echo("\n".join(_lines(summary)))


def report(
    src: Dataset,
    out: Annotated[Path, typer.Option("--out", help="HTML file to write (one file: images inline, no network).")] =
        Path("report.html"),
    n: Annotated[int, typer.Option("--n", "-n", help="Samples shown, evenly spread over the dataset.")] = 48,
) -> None:
    """One self-contained HTML page: N samples with toggleable overlays, the class legend, class frequencies, the
    quality histogram and the filtered / failed samples."""
    if n < 1:
        fail("--n must be ≥ 1", code=2)
    from ..io.report import write_report

    with clean_errors():
        wrote = write_report(src, out, n=n)
    err.print(f"{wrote['path']}: {wrote['thumbnails']} of {wrote['samples']} samples, {wrote['classes']} classes in "
              f"the legend, {wrote['rejected']} filtered / failed ({wrote['bytes'] / 1024:.0f} KiB)", highlight=False,
              soft_wrap=True, markup=False)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _num(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _lines(s: dict) -> list[str]:
    """The summary (io.summary.summarize) as aligned text lines."""
    from ..io.preview import unit_suffix

    sm, sh, q = s["samples"], s["shards"], s["quality"]
    lines = [f"{s['location']}: {s['format']}, {'whole' if s['whole'] else 'NOT whole'}",
             f"samples   {sm['written']} written of {sm['planned']} planned ({sm['filtered']} filtered, "
             f"{sm['failed']} failed" + (f", {sm['missing']} in shards not whole" if sm["missing"] else "") + ")",
             f"shards    {sh['whole']} of {sh['planned']} whole, {_size(s['bytes'])}"]
    lines += [f"          unfinished  {name}" for name in sh["unfinished"]]
    lines += [f"          damaged     {name}: {why}" for name, why in sh["damaged"].items()]
    lines += [f"          stray       {name}: not a shard of this dataset" for name in sh["stray"]]
    bb = s["backbone"]
    lines.append("backbone  " + " ".join(str(bb[k]) for k in ("family", "name") if bb.get(k))
                 + "".join(f", {k} {v}" for k, v in bb.items() if k not in ("family", "name")))
    for task, head in s["heads"].items():
        if isinstance(head, dict) and "file" in head:
            lines.append(f"head      {task}: {head['file']} (sha256 {str(head.get('sha256', ''))[:12]}, layers "
                         f"{head.get('layers')}, sigmas {head.get('sigmas')})")
        else:
            lines.append(f"head      {task}: {head}")
    lines.append(f"tasks     {', '.join(s['tasks'])}")
    im = s["image"]
    lines.append(f"image     {im['width']}×{im['height']} {im['format']}")
    lines.append("sampling  " + ", ".join(f"{k} {v!r}" if isinstance(v, str) else f"{k} {v}"
                                          for k, v in s["sampling"].items()))
    lines.append(f"quality   {q['scored']} scored: min {_num(q['min'])}, q1 {_num(q['q1'])}, "
                 f"median {_num(q['median'])}, q3 {_num(q['q3'])}, max {_num(q['max'])}; "
                 f"{q['filtered']} filtered, {q['failed']} failed"
                 + (f" (min_quality {q['min_quality']})" if q["min_quality"] is not None else ""))
    for task, v in s["values"].items():
        unit = unit_suffix(v["unit"])
        lines.append(f"{task:<9} {_num(v['min'], 2)}–{_num(v['max'], 2)}{unit}, mean {_num(v['mean'], 2)}{unit} "
                     f"over {v['valid_pixels']} valid pixels")
    for task, rows in s["classes"].items():
        width = max([len(r["name"]) for r in rows] + [5])
        lines.append(f"{task} classes ({s['ignore_pixels'][task]} ignore pixels)")
        lines.append(f"  {'id':>3} {'class':<{width}} {'pixels':>12} {'share':>7} {'images':>7} {'instances':>9}")
        for r in rows:
            inst = "–" if r["instances"] is None else str(r["instances"])
            lines.append(f"  {r['id']:>3} {r['name']:<{width}} {r['pixels']:>12} {100 * r['share']:>6.2f}% "
                         f"{r['images']:>7} {inst:>9}")
    return lines
