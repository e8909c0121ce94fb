"""`info`, `report` and the contact sheet's legend: counts equal to what the shards hold, and the report page as a
real headless browser builds and draws it."""

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from mmdiff_gen.cli import app
from mmdiff_gen.io.dataset import DATASET_FILE
from mmdiff_gen.io.members import (IGNORE_INDEX, decode_depth, encode_depth, encode_gray, encode_image, encode_json,
                                   label_info)
from mmdiff_gen.io.preview import ELLIPSIS, class_colours, contact_sheet, ellipsize
from mmdiff_gen.io.report import CSP
from mmdiff_gen.io.shards import ShardWriter, write_json_atomic

run = CliRunner().invoke
H, W = 40, 56  # not square: a swapped axis shows
CLASSES = ["background", "circle", "square", "ring"]  # "ring" occurs nowhere: no legend entry
PALETTE = [[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25]]  # none of them is in the grey images
OPENSEG = ["background", "thing"]
MIN_QUALITY = 0.5
PER_PROMPT, SHARD_SIZE, N = 2, 4, 8  # 4 prompts × 2 images, 2 shards
LONG = "a large red circle on the left and " * 6 + "the end"
# key → what became of it: quality score, or the error of a failed sample
FATE = {0: 0.91, 1: 0.83, 2: 0.77, 3: 0.2, 4: 0.95, 5: 0.64, 6: "RuntimeError: CUDA error: boom", 7: 0.31}
# key → (circle instances, square instances) drawn by `labels`
INSTANCES = {k: (k % 3 + 1, 1 - k % 2) for k in range(N)}


MARKUP = 'a "ring" </script><u>underlined</u> & co'  # a prompt the page must show as text, not run as markup


def prompt(k: int) -> str:
    return {0: LONG, 2: MARKUP}.get(k // PER_PROMPT, f"prompt {k // PER_PROMPT}")


def labels(k: int) -> dict[str, np.ndarray]:
    """Sample k's label maps: INSTANCES[k] separate circles (class 1) and squares (class 2), an ignore band in
    sample 1, saliency where there is an object, depth 1.5 + k / 4 m growing to the right, openseg's "thing" on
    the circles."""
    seg = np.zeros((H, W), np.uint8)
    yy, xx = np.mgrid[:H, :W]
    circles, squares = INSTANCES[k]
    for j in range(circles):
        seg[(yy - 10) ** 2 + (xx - 8 - 16 * j) ** 2 <= 25] = 1
    if squares:
        seg[26:34, 30:40] = 2
    if k == 1:
        seg[-2:] = IGNORE_INDEX
    depth = (1.5 + k / 4 + xx / W).astype(np.float32)
    return {"seg": seg, "saliency": np.where(seg == 0, 0, 255).astype(np.uint8), "depth": depth,
            "openseg": (seg == 1).astype(np.uint8)}


def write_dataset(root: Path) -> None:
    """A webdataset folder as `generate` lays it out: dataset.json, 2 shards, done markers whose records say
    which samples were written, filtered (below MIN_QUALITY) or failed."""
    fingerprint = "0" * 64
    for shard in range(N // SHARD_SIZE):
        records = []
        with ShardWriter(root, shard, "webdataset") as w:
            for k in range(shard * SHARD_SIZE, (shard + 1) * SHARD_SIZE):
                key = f"{k:09d}"
                base = {"key": key, "prompt_index": k // PER_PROMPT, "repeat": k % PER_PROMPT}
                if isinstance(FATE[k], str):
                    records.append({**base, "status": "error", "error": FATE[k]})
                    continue
                status = "ok" if FATE[k] >= MIN_QUALITY else "filtered"
                records.append({**base, "quality": FATE[k], "status": status})
                if status == "ok":
                    lab = labels(k)
                    image = np.full((H, W, 3), 100 + 10 * k, np.uint8)
                    w.write(key, {"png": encode_image(image, "png"), "txt": prompt(k).encode(),
                                  "json": encode_json({**base, "seed": k, "quality": {"score": FATE[k]}}),
                                  "seg.png": encode_gray(lab["seg"]), "sal.png": encode_gray(lab["saliency"]),
                                  "depth.png": encode_depth(lab["depth"]), "openseg.png": encode_gray(lab["openseg"])})
            ok = sum(r["status"] == "ok" for r in records)
            w.commit({"shard": f"{shard:05d}", "fingerprint": fingerprint, "attempted": len(records), "written": ok,
                      "failed": sum(r["status"] == "error" for r in records),
                      "filtered": sum(r["status"] == "filtered" for r in records), "samples": records})
    write_json_atomic(root / DATASET_FILE, {
        "format_version": 1, "fingerprint": fingerprint, "format": "webdataset", "image_format": "png",
        "tasks": ["seg", "saliency", "depth", "openseg"], "num_prompts": N // PER_PROMPT, "num_samples": N,
        "shard_size": SHARD_SIZE, "num_shards": N // SHARD_SIZE,
        "sampling": {"images_per_prompt": PER_PROMPT, "seed": 0, "height": H, "width": W, "num_inference_steps": 4},
        "backbone": {"family": "flux", "name": "test", "config_sha256": "c0ffee"},
        "heads": {t: {"file": f"{t}.safetensors", "sha256": "ab" * 32, "layers": [1], "sigmas": [0.5]}
                  for t in ("seg", "saliency", "depth")},
        "classes": CLASSES, "palette": PALETTE, "ignore_index": IGNORE_INDEX,
        "seg": label_info("seg"), "saliency": label_info("saliency"), "depth": label_info("depth", "metre"),
        "openseg": {"classes": OPENSEG, "layer": 1, "sigma": 0.52, "threshold": 0.5},
        "quality": {"field": "json member's quality.score", "min_quality": MIN_QUALITY}})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("look") / "ds"
    root.mkdir()
    write_dataset(root)
    return root


WRITTEN = [k for k, f in FATE.items() if not isinstance(f, str) and f >= MIN_QUALITY]


def test_info_json_counts_equal_what_the_shards_hold(dataset):
    res = run(app, ["info", str(dataset), "--json"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    assert s["whole"] and s["problems"] == "" and s["shards"] == {"planned": 2, "whole": 2, "unfinished": [],
                                                                  "damaged": {}, "stray": []}
    assert s["samples"] == {"planned": 8, "attempted": 8, "written": len(WRITTEN), "filtered": 2, "failed": 1,
                            "missing": 0}
    assert s["bytes"] == sum(p.stat().st_size for p in dataset.glob("*.tar"))
    assert s["tasks"] == ["seg", "saliency", "depth", "openseg"] and s["backbone"]["name"] == "test"
    assert set(s["heads"]) == {"seg", "saliency", "depth"} and s["image"] == {"height": H, "width": W, "format": "png"}
    assert s["sampling"]["num_inference_steps"] == 4

    seg = np.stack([labels(k)["seg"] for k in WRITTEN])
    pixels = np.bincount(seg.ravel(), minlength=256)
    rows = {r["name"]: r for r in s["classes"]["seg"]}
    assert list(rows) == CLASSES
    for i, name in enumerate(CLASSES):
        assert rows[name]["pixels"] == pixels[i] and rows[name]["colour"] == PALETTE[i]
        assert rows[name]["images"] == sum(bool((m == i).any()) for m in seg)
    assert rows["circle"]["instances"] == sum(INSTANCES[k][0] for k in WRITTEN)
    assert rows["square"]["instances"] == sum(INSTANCES[k][1] for k in WRITTEN)
    assert rows["ring"]["instances"] == 0 and rows["background"]["instances"] is None
    assert s["ignore_pixels"]["seg"] == pixels[IGNORE_INDEX] > 0
    assert sum(r["share"] for r in rows.values()) == pytest.approx(1.0)
    thing = {r["name"]: r for r in s["classes"]["openseg"]}["thing"]
    assert thing["instances"] == rows["circle"]["instances"] and thing["pixels"] == pixels[1]

    depth = [decode_depth(encode_depth(labels(k)["depth"])) for k in WRITTEN]  # as stored: millimetres
    assert s["values"]["depth"]["unit"] == "metre"
    assert s["values"]["depth"]["min"] == pytest.approx(min(d.min() for d in depth))
    assert s["values"]["depth"]["max"] == pytest.approx(max(d.max() for d in depth))

    scores = [f for f in FATE.values() if not isinstance(f, str)]
    q = s["quality"]
    assert (q["scored"], q["filtered"], q["failed"], q["min_quality"]) == (len(scores), 2, 1, MIN_QUALITY)
    quartiles = np.percentile(scores, [0, 25, 50, 75, 100])
    assert [q[k] for k in ("min", "q1", "median", "q3", "max")] == pytest.approx(quartiles)
    assert sum(q["histogram"]["counts"]) == len(scores) and q["histogram"]["edges"][0] <= MIN_QUALITY
    rejected = {r["key"]: r for r in s["rejected"]}
    assert sorted(rejected) == ["000000003", "000000006", "000000007"]
    assert rejected["000000006"]["error"] == FATE[6] and rejected["000000003"]["quality"] == FATE[3]
    assert rejected["000000003"]["prompt"] == prompt(3)  # its prompt's other image was written
    assert rejected["000000007"]["prompt"] is None  # neither image of prompt 3 was written: its text is nowhere


def test_info_text_and_an_incomplete_dataset_read_from_a_url(dataset, tmp_path):
    res = run(app, ["info", str(dataset)])
    assert res.exit_code == 0, res.output
    text = res.stdout
    assert f"{dataset}: webdataset, whole" in text
    assert "samples   5 written of 8 planned (2 filtered, 1 failed)" in text and "shards    2 of 2 whole" in text
    assert "quality   7 scored" in text and f"(min_quality {MIN_QUALITY})" in text
    seg = np.stack([labels(k)["seg"] for k in WRITTEN])
    assert any(ln.split()[:3] == ["1", "circle", str(int((seg == 1).sum()))] for ln in text.splitlines())

    # Not whole: a third shard planned but never written, shard 1 truncated, a tar of no shard of it.
    broken = tmp_path / "broken"
    shutil.copytree(dataset, broken)
    info = json.loads((broken / DATASET_FILE).read_text())
    write_json_atomic(broken / DATASET_FILE, info | {"num_samples": 12, "num_shards": 3})
    with open(broken / "00001.tar", "r+b") as f:
        f.truncate(1024)
    (broken / "00009.tar").write_bytes(b"")
    import fsspec

    fs = fsspec.filesystem("memory")  # an object store's code path (io.store.FsspecStore), in this process
    for p in broken.iterdir():
        fs.pipe_file(f"/look-broken/{p.name}", p.read_bytes())
    for where in (str(broken), "memory://look-broken"):
        res = run(app, ["info", where])
        assert res.exit_code == 0, res.output
        assert "NOT whole" in res.stdout and "shards    1 of 3 whole" in res.stdout
        assert "unfinished  00002" in res.stdout and "damaged     00001: 00001.tar has 1024 bytes" in res.stdout
        assert "stray       00009.tar" in res.stdout
        s = json.loads(run(app, ["info", where, "--json"]).stdout)
        shard0 = [k for k in WRITTEN if k < SHARD_SIZE]
        assert s["samples"]["written"] == len(shard0) and s["samples"]["missing"] == 12 - SHARD_SIZE
        assert {r["name"]: r["pixels"] for r in s["classes"]["seg"]}["circle"] == \
            sum(int((labels(k)["seg"] == 1).sum()) for k in shard0)


def test_info_and_report_errors_are_one_line(dataset, tmp_path):
    res = run(app, ["info", str(tmp_path / "nowhere")])
    assert res.exit_code != 0 and res.output.strip().count("\n") == 0 and "has no dataset.json" in res.output
    (tmp_path / "garbled").mkdir()
    (tmp_path / "garbled" / DATASET_FILE).write_text("{not json")
    res = run(app, ["report", str(tmp_path / "garbled"), "--out", str(tmp_path / "r.html")])
    assert res.exit_code == 1 and res.output.strip().count("\n") == 0 and "not readable JSON" in res.output
    res = run(app, ["report", str(dataset), "--out", str(tmp_path / "r.html"), "-n", "0"])
    assert res.exit_code == 2 and "--n must be ≥ 1" in res.output and not (tmp_path / "r.html").exists()


def _count(rgb: np.ndarray, colour) -> int:
    return int((rgb == np.array(colour, np.uint8)).all(-1).sum())


def test_contact_sheet_legend_colour_bar_and_ellipsis(dataset, tmp_path):
    assert contact_sheet(dataset, tmp_path / "sheet.png", n=3) == 3
    sheet = np.asarray(Image.open(tmp_path / "sheet.png").convert("RGB"))
    assert sheet.shape[1] == 5 * 128  # image + 4 tasks; the legend and colour bar add height only
    swatch = 10 * 10
    assert _count(sheet, PALETTE[1]) >= swatch and _count(sheet, PALETTE[2]) >= swatch  # circle, square
    assert _count(sheet, PALETTE[3]) == 0  # ring occurs in no row: no legend entry
    assert _count(sheet, class_colours([])[1]) >= swatch  # openseg's "thing", in its stable colour
    # The colour bar spans the depth ramp: its near (bright) and far (dark) ends.
    assert _count(sheet, [252, 253, 191]) >= 10 and _count(sheet, [0, 0, 4]) >= 10

    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    cut = ellipsize(draw, LONG, 200)
    assert cut.endswith(ELLIPSIS) and draw.textlength(cut) <= 200 and LONG.startswith(cut[:-1])
    assert ellipsize(draw, "short", 200) == "short"


class _Tags(HTMLParser):
    """Every start tag of a document as (tag, attrs), and the text of each <td> and <figcaption>."""

    TEXT = ("td", "figcaption")

    def __init__(self, html: str):
        super().__init__()
        self.tags, self.cells, self._in = [], [], False
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in = tag in self.TEXT
        if self._in:
            self.cells.append("")

    def handle_endtag(self, tag):
        self._in = self._in and tag not in self.TEXT

    def handle_data(self, data):
        if self._in:
            self.cells[-1] += data

    def find(self, tag, **attrs):
        return [a for t, a in self.tags if t == tag and all(a.get(k.replace("_", "-")) == v for k, v in attrs.items())]


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("no chromium on PATH: the report is checked in a real headless browser (apt-get install chromium)")
    return found


def _browser(exe: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--force-color-profile=srgb",
                           "--hide-scrollbars", f"--user-data-dir={profile}", "--window-size=1280,2000", *args],
                          capture_output=True, text=True, timeout=90)


def test_report_in_a_headless_browser(dataset, tmp_path):
    exe = _chromium()
    page = tmp_path / "report.html"
    res = run(app, ["report", str(dataset), "--out", str(page), "-n", "4"])
    assert res.exit_code == 0, res.output
    html = page.read_text()
    assert f'content="{CSP}"' in html  # the page may fetch nothing, whatever it holds
    dom = _browser(exe, tmp_path / "profile", "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    tags = _Tags(dom.stdout)
    assert tags.find("body", data_ready="1"), "the page's script did not finish"

    # 4 thumbnails evenly spread over the 5 written samples (indices 0, 1, 3, 4), each with a layer per task.
    samples = tags.find("figure", **{"class": "sample"})
    assert [s["data-key"] for s in samples] == [f"{WRITTEN[i]:09d}" for i in (0, 1, 3, 4)]
    assert any(c.endswith(MARKUP) for c in tags.cells)  # keys 4 and 5's captions, as text
    assert not tags.find("u")
    images = [a for t, a in tags.tags if t == "img"]
    assert images and all(a["src"].startswith("data:image/") for a in images)
    for task in ("seg", "saliency", "depth", "openseg"):
        assert len(tags.find("img", data_task=task)) == 4
    toggles = [a for t, a in tags.tags if t == "input" and a.get("type") == "checkbox"]
    assert [a["data-task"] for a in toggles] == ["seg", "saliency", "depth", "openseg"]
    # Class overlays start shown, the other layers hidden (each checkbox's handler sets its layers' display).
    assert all("none" not in a.get("style", "") for a in tags.find("img", data_task="seg"))
    assert all("display: none" in a.get("style", "") for a in tags.find("img", data_task="depth"))

    legend = [a["data-class"] for a in tags.find("span", **{"class": "legend-entry"})]
    assert legend == ["circle", "square", "thing"]  # seg's classes that occur (not ring), then openseg's
    assert {a["data-class"] for a in tags.find("rect", **{"class": "class-bar"})} >= {"background", "circle", "square"}
    assert len(tags.find("rect", **{"class": "quality-bar"})) == 20 and tags.find("line", id="threshold")
    rows = tags.find("tr", **{"class": "rejected-row"})
    assert sorted(r["data-status"] for r in rows) == ["error", "filtered", "filtered"]
    assert FATE[6] in tags.cells and "quality 0.200" in tags.cells
    assert any("no sample of it was written" in c for c in tags.cells)

    shot = tmp_path / "shot.png"
    res = _browser(exe, tmp_path / "profile", f"--screenshot={shot}", page.as_uri())
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    rgb = np.asarray(Image.open(shot).convert("RGB"))
    assert rgb.shape[:2] == (2000, 1280) and len(np.unique(rgb.reshape(-1, 3), axis=0)) > 50  # not blank
    for colour in (PALETTE[1], PALETTE[2], class_colours([])[1]):  # legend swatches are 16 × 16
        assert _count(rgb, colour) >= 16 * 16, colour
