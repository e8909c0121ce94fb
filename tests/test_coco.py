"""COCO export: one iscrowd-0 annotation per connected component, min_area, and a pycocotools round trip."""

import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from typer.testing import CliRunner

from mmdiff_gen.cli import app
from mmdiff_gen.io.coco import export_coco
from mmdiff_gen.io.dataset import DATASET_FILE
from mmdiff_gen.io.members import IGNORE_INDEX, decode_gray, encode_gray, encode_image, encode_json
from mmdiff_gen.io.shards import ShardWriter, write_json_atomic

H, W = 48, 64  # not square: a swapped axis shows
CLASSES = ["background", "circle", "square"]


def disc(cy, cx, r):
    yy, xx = np.mgrid[:H, :W]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def tight_box(mask):
    """COCO [x, y, w, h] of a binary mask's pixels."""
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def label_maps():
    """key → (H, W) class-id map; the comment says how many circle / square instances it holds."""
    two_discs = np.zeros((H, W), np.uint8)  # 2 circles, 1 square
    two_discs[disc(12, 14, 6)] = 1
    two_discs[disc(30, 46, 8)] = 1
    two_discs[36:44, 4:12] = 2
    corners = np.zeros((H, W), np.uint8)  # 1 + 2 circles (corner contact joins, a 1-pixel gap separates), 1 square
    corners[5:10, 5:10] = 1
    corners[10:15, 10:15] = 1  # meets the first square only at the corner (9, 9)–(10, 10)
    corners[5:10, 20:25] = 1
    corners[5:10, 26:31] = 1  # column 25 between them
    corners[15:20, 10:15] = 2  # shares an edge with a circle region: still its own (other class) annotation
    speck = np.zeros((H, W), np.uint8)  # 2 circles (one a 2×2 speck), an ignore band
    speck[disc(24, 32, 10)] = 1
    speck[0:2, 60:62] = 1
    speck[46:, :] = IGNORE_INDEX
    empty = np.zeros((H, W), np.uint8)  # nothing to annotate
    return {"000000000": two_discs, "000000001": corners, "000000002": speck, "000000003": empty}


def write_dataset(root):
    """A seg-only webdataset folder, one shard, as `generate` lays it out (dataset.json + shard + done marker)."""
    root.mkdir()
    fingerprint = "0" * 64
    maps = label_maps()
    records = []
    with ShardWriter(root, 0, "webdataset") as w:
        for i, (key, seg) in enumerate(maps.items()):
            image = np.stack([seg * 80] * 3, axis=-1).astype(np.uint8)
            w.write(key, {"png": encode_image(image, "png"), "txt": f"prompt {i}".encode(),
                          "json": encode_json({"key": key, "seed": i, "quality": {"score": 1.0}}),
                          "seg.png": encode_gray(seg)})
            records.append({"key": key, "prompt_index": i, "repeat": 0, "quality": 1.0, "status": "ok"})
        w.commit({"shard": "00000", "fingerprint": fingerprint, "attempted": len(records), "written": len(records),
                  "failed": 0, "filtered": 0, "samples": records})
    write_json_atomic(root / DATASET_FILE, {
        "format_version": 1, "fingerprint": fingerprint, "format": "webdataset", "image_format": "png",
        "tasks": ["seg"], "num_samples": len(maps), "shard_size": len(maps), "num_shards": 1,
        "backbone": {"name": "test"}, "classes": CLASSES, "palette": [[0, 0, 0], [255, 0, 0], [0, 0, 255]],
        "ignore_index": IGNORE_INDEX})
    return maps


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco") / "ds"
    return root, write_dataset(root)


@pytest.fixture(scope="module")
def exported(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    counts = export_coco(dataset[0], out)
    return out, counts, json.loads((out / "annotations.json").read_text())


def anns_of(coco_json, image_index, category_id):
    return [a for a in coco_json["annotations"] if a["image_id"] == image_index + 1 and a["category_id"] == category_id]


def test_two_objects_two_annotations(dataset, exported):
    _, counts, data = exported
    maps = dataset[1]
    circles = anns_of(data, 0, 1)
    assert len(circles) == 2 and all(a["iscrowd"] == 0 for a in data["annotations"])
    expected = [disc(12, 14, 6), disc(30, 46, 8)]
    assert [a["bbox"] for a in circles] == [tight_box(m) for m in expected]  # each box holds its own disc only
    assert [a["area"] for a in circles] == [float(m.sum()) for m in expected]
    assert [a["bbox"] for a in anns_of(data, 0, 2)] == [[4.0, 36.0, 8.0, 8.0]]
    assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"]) == counts["annotations"]
    assert counts == {"images": 4, "annotations": 3 + 4 + 2, "categories": 2, "dropped": 0}
    assert not anns_of(data, 3, 1) and not anns_of(data, 3, 2)
    assert np.array_equal(decode_gray((exported[0] / "labels" / "000000000.png").read_bytes()), maps["000000000"])


def test_connectivity_is_8(exported):
    circles = anns_of(exported[2], 1, 1)
    # the two squares meeting at a corner are one instance; the two a column apart are two
    assert sorted(a["bbox"] for a in circles) == [[5.0, 5.0, 10.0, 10.0], [20.0, 5.0, 5.0, 5.0], [26.0, 5.0, 5.0, 5.0]]
    assert [a["bbox"] for a in anns_of(exported[2], 1, 2)] == [[10.0, 15.0, 5.0, 5.0]]


def test_min_area_drops_small_components_only_from_annotations(dataset, tmp_path):
    root, maps = dataset
    counts = export_coco(root, tmp_path / "c", min_area=5)
    data = json.loads((tmp_path / "c" / "annotations.json").read_text())
    assert counts["dropped"] == 1 and counts["annotations"] == 9 - 1
    assert [a["bbox"] for a in anns_of(data, 2, 1)] == [tight_box(disc(24, 32, 10))]  # the 2×2 speck is gone
    assert min(a["area"] for a in data["annotations"]) >= 5
    assert np.array_equal(decode_gray((tmp_path / "c" / "labels" / "000000002.png").read_bytes()), maps["000000002"])
    assert export_coco(root, tmp_path / "d", min_area=4)["dropped"] == 0  # a component of exactly min_area stays
    with pytest.raises(ValueError, match="min_area must be ≥ 0"):
        export_coco(root, tmp_path / "e", min_area=-1)


def test_cli_min_area(dataset, tmp_path):
    run = CliRunner().invoke
    res = run(app, ["export", "--in", str(dataset[0]), "--out", str(tmp_path / "c"), "--min-area", "5"])
    assert res.exit_code == 0, res.output
    assert "8 annotations" in res.output and "1 instance(s) under --min-area" in res.output
    res = run(app, ["export", "--in", str(dataset[0]), "--out", str(tmp_path / "d"), "--min-area", "-3"])
    assert res.exit_code == 2 and "--min-area must be ≥ 0" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "d").exists()


def test_pycocotools_round_trip_and_self_eval_ap_1(dataset, exported):
    out, _, _ = exported
    maps = dataset[1]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(out / "annotations.json"))
    for img in gt.dataset["images"]:
        seg = maps[img["file_name"].split(".")[0]]
        for cid in gt.getCatIds():
            masks = [gt.annToMask(a) for a in gt.loadAnns(gt.getAnnIds(imgIds=img["id"], catIds=[cid]))]
            union = np.sum(masks, axis=0) if masks else np.zeros((H, W))
            assert union.max(initial=0) <= 1  # instances of one class never overlap
            assert np.array_equal(union.astype(bool), seg == cid)
            for m, a in zip(masks, gt.loadAnns(gt.getAnnIds(imgIds=img["id"], catIds=[cid]))):
                assert a["area"] == m.sum() and a["bbox"] == tight_box(m)
    anns = gt.dataset["annotations"]
    for iou_type, key in (("segm", "segmentation"), ("bbox", "bbox")):
        results = [{"image_id": a["image_id"], "category_id": a["category_id"], key: a[key], "score": 1.0}
                   for a in anns]
        with contextlib.redirect_stdout(io.StringIO()):
            ev = COCOeval(gt, gt.loadRes(results), iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        assert ev.stats[0] == pytest.approx(1.0) and ev.stats[1] == pytest.approx(1.0), iou_type  # AP, AP50


def test_rle_is_pycocotools_own_encoding(exported):
    """The JSON RLE decodes with mask_utils directly (counts as a str), the form detectron2 and mmdet read."""
    a = exported[2]["annotations"][0]
    rle = {"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()}
    assert rle["size"] == [H, W] and mask_utils.decode(rle).sum() == a["area"]



def test_polygons_rasterize_to_the_components_with_holes_filled(dataset, exported, tmp_path):
    """--mask-format polygon, for loaders that call frPyObjects on every segmentation (torchvision's detection
    references, DETR-style code) or read polygons (detectron2's default): each annotation's polygons give back
    exactly its component's pixels; a hole is filled."""
    from scipy import ndimage

    from mmdiff_gen.io.coco import polygon_annotation

    root, maps = dataset
    res = CliRunner().invoke(app, ["export", "--in", str(root), "--out", str(tmp_path / "p"), "--mask-format", "polygon"])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "p" / "annotations.json").read_text())
    assert data["info"]["mmdiff_gen"]["mask_format"] == "polygon (holes filled)"
    assert [(a["image_id"], a["category_id"]) for a in data["annotations"]] == [
        (a["image_id"], a["category_id"]) for a in exported[2]["annotations"]]  # the same instances as RLE
    for a in data["annotations"]:
        poly = a["segmentation"]
        assert poly and all(len(p) >= 6 and len(p) % 2 == 0 for p in poly)
        drawn = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(poly, H, W))).astype(bool)
        seg = maps[data["images"][a["image_id"] - 1]["file_name"].split(".")[0]]
        comp = ndimage.label(seg == a["category_id"], structure=np.ones((3, 3), bool))[0]
        assert np.array_equal(drawn, comp == comp[drawn][0])  # exactly one component's pixels (none has holes)
        assert drawn.sum() == a["area"] and tight_box(drawn) == a["bbox"]
    ring = disc(24, 32, 12) & ~disc(24, 32, 5)
    a = polygon_annotation(ring, 1, 1, 1)
    drawn = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], H, W))).astype(bool)
    assert np.array_equal(drawn, disc(24, 32, 12)) and a["area"] == drawn.sum() > ring.sum()
    res = CliRunner().invoke(app, ["export", "--in", str(root), "--out", str(tmp_path / "q"), "--mask-format", "bitmap"])
    assert res.exit_code == 2 and "--mask-format" in res.output
