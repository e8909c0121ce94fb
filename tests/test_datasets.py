"""Public-dataset readers on tiny fixtures written in each dataset's real on-disk layout."""

import json
import warnings

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from mmdiff_gen.io.datasets import (
    VOC_CLASSES,
    NYULabeledDataset,
    VOCDataset,
    open_dataset,
    voc_palette,
)
from mmdiff_gen.io.files import FilesWriter

RNG = np.random.default_rng(0)


def _rgb(path, h, w):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(image).save(path)
    return image


def _png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(array)
    (im.convert(mode) if mode else im).save(path)


def _ids(h, w, cls):
    """(H, W) uint8: background, a block of `cls`, a 255 boundary around the block."""
    seg = np.zeros((h, w), np.uint8)
    seg[4:h - 4, 4:w - 4] = 255
    seg[5:h - 5, 5:w - 5] = cls
    return seg


# ---------------------------------------------------------------- PASCAL VOC + SBD

def _voc_palette_png(path, seg):
    im = Image.frombytes("P", seg.shape[::-1], seg.tobytes())  # (H, W) indices; the colours are only a palette
    im.putpalette([v for rgb in voc_palette(256) for v in rgb])
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


@pytest.fixture
def voc(tmp_path):
    """VOC: a, b train; c val; SegmentationClassAug a (shadowed by SegmentationClass) and d; SBD d, e, c."""
    root = tmp_path / "VOCdevkit" / "VOC2012"
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("2007_000001\n2007_000002\n")
    (sets / "val.txt").write_text("2008_000003\n")
    (sets / "trainval.txt").write_text("2007_000001\n2007_000002\n2008_000003\n")
    labels = {}
    for i, (name, (h, w)) in enumerate({"2007_000001": (24, 32), "2007_000002": (30, 20), "2008_000003": (24, 32),
                                        "2009_000004": (30, 20), "2010_000005": (24, 32)}.items()):
        _rgb(root / "JPEGImages" / f"{name}.jpg", h, w)
        labels[name] = _ids(h, w, cls=15 + i)  # person, pottedplant, sheep, sofa, train
    for name in ("2007_000001", "2007_000002", "2008_000003"):
        _voc_palette_png(root / "SegmentationClass" / f"{name}.png", labels[name])
    _png(root / "SegmentationClassAug" / "2007_000001.png", np.full((24, 32), 7, np.uint8))  # shadowed
    _png(root / "SegmentationClassAug" / "2009_000004.png", labels["2009_000004"])
    sbd = tmp_path / "benchmark_RELEASE" / "dataset"
    (sbd / "cls").mkdir(parents=True)
    (sbd / "train.txt").write_text("2009_000004\n2008_000003\n")
    (sbd / "val.txt").write_text("2010_000005\n")
    savemat(sbd / "cls" / "2009_000004.mat", {"GTcls": {"Segmentation": np.full((30, 20), 9, np.uint8)}})
    savemat(sbd / "cls" / "2010_000005.mat", {"GTcls": {"Segmentation": labels["2010_000005"]}})
    return root, labels


def test_voc_reads_palette_indices_and_boundary(voc):
    root, labels = voc
    ds = open_dataset(f"voc:{root}", split="train")
    assert ds.keys == ["2007_000001", "2007_000002"]
    assert ds.classes == VOC_CLASSES and len(ds.classes) == 21 and ds.classes[0] == "background"
    s = ds[1]
    assert s.image.shape == (30, 20, 3) and s.labels.get("seg").dtype == np.uint8
    np.testing.assert_array_equal(s.labels.get("seg"), labels["2007_000002"])  # indices, not colours; 255 kept
    assert set(np.unique(s.labels.get("seg"))) == {0, 16, 255} and s.caption == "" and s.labels.get("depth") is None


def test_voc_palette_is_the_standard_colormap():
    pal = voc_palette()
    assert len(pal) == 21
    assert pal[0] == [0, 0, 0] and pal[1] == [128, 0, 0] and pal[15] == [192, 128, 128] and pal[20] == [0, 64, 128]


def test_voc_train_aug_from_sbd_and_lookup_order(voc, tmp_path):
    _, labels = voc
    ds = open_dataset(f"voc:{tmp_path}")  # parent of VOCdevkit; SBD found beside it; default train_aug
    assert ds.split == "train_aug"
    # (SBD train ∪ SBD val ∪ VOC train) − VOC val
    assert ds.keys == ["2007_000001", "2007_000002", "2009_000004", "2010_000005"]
    by_key = {s.key: s.labels.get("seg") for s in ds}
    np.testing.assert_array_equal(by_key["2007_000001"], labels["2007_000001"])  # SegmentationClass first
    np.testing.assert_array_equal(by_key["2009_000004"], labels["2009_000004"])  # then Aug, before SBD
    np.testing.assert_array_equal(by_key["2010_000005"], labels["2010_000005"])  # then SBD .mat


def test_voc_train_aug_list_and_aug_folder_without_sbd(voc, tmp_path):
    root, _ = voc
    (tmp_path / "benchmark_RELEASE" / "dataset" / "cls" / "2010_000005.mat").unlink()
    (tmp_path / "benchmark_RELEASE").rename(tmp_path / "elsewhere")
    # without SBD: (SegmentationClassAug ∪ VOC train) − VOC val
    assert VOCDataset(root).keys == ["2007_000001", "2007_000002", "2009_000004"]
    with pytest.raises(FileNotFoundError, match="2010_000005"):
        VOCDataset(root, sbd=tmp_path / "elsewhere")  # an explicit SBD root whose val id lacks a label
    (root / "train_aug.txt").write_text("/JPEGImages/2009_000004.jpg /SegmentationClassAug/2009_000004.png\n")
    assert VOCDataset(root, "train_aug").keys == ["2009_000004"]  # a ready list is read as it is


def test_voc_errors(voc, tmp_path):
    root, _ = voc
    with pytest.raises(ValueError, match="unknown VOC split 'test'"):
        open_dataset(f"voc:{root}", split="test")
    (root / "ImageSets" / "Segmentation" / "trainval.txt").unlink()
    with pytest.raises(FileNotFoundError, match="trainval.txt: no such split list"):
        open_dataset(f"voc:{root}", split="trainval")
    with pytest.raises(FileNotFoundError, match="not PASCAL VOC"):
        open_dataset(f"voc:{tmp_path / 'benchmark_RELEASE'}")


# ---------------------------------------------------------------- DUTS

@pytest.fixture
def duts(tmp_path):
    masks = {}
    for split, names in (("TR", ["sun_a", "sun_b"]), ("TE", ["ILSVRC_c"])):
        folder = tmp_path / f"DUTS-{split}"
        for name in names:
            _rgb(folder / f"DUTS-{split}-Image" / f"{name}.jpg", 24, 32)
            mask = np.where(RNG.random((24, 32)) > 0.5, 255, 0).astype(np.uint8)
            mask[0, 0] = 3  # a resaved mask's in-between value is kept as stored
            masks[name] = mask
            _png(folder / f"DUTS-{split}-Mask" / f"{name}.png", mask, mode="RGB" if name == "sun_b" else None)
    return tmp_path, masks


def test_duts_splits_and_masks(duts):
    root, masks = duts
    tr = open_dataset(f"duts:{root}")
    assert tr.keys == ["sun_a", "sun_b"] and tr.classes == []
    for s in tr:
        assert s.labels.get("seg") is None and s.labels.get("depth") is None and s.image.shape == (24, 32, 3)
        np.testing.assert_array_equal(s.labels.get("saliency"), masks[s.key])  # the RGB-stored one too
    assert open_dataset(f"duts:{root}", split="te").keys == ["ILSVRC_c"]
    assert open_dataset(f"duts:{root}", split="test").keys == ["ILSVRC_c"]
    assert open_dataset(f"duts:{root / 'DUTS-TR'}", split="train").keys == ["sun_a", "sun_b"]  # the split folder


def test_duts_errors(duts):
    root, _ = duts
    with pytest.raises(ValueError, match="expected TR or TE"):
        open_dataset(f"duts:{root}", split="val")
    with pytest.raises(ValueError, match="no TE split"):
        open_dataset(f"duts:{root / 'DUTS-TR'}", split="TE")
    (root / "DUTS-TE" / "DUTS-TE-Mask" / "ILSVRC_c.png").unlink()
    with pytest.raises(FileNotFoundError, match="no mask for image ILSVRC_c"):
        open_dataset(f"duts:{root}", split="TE")


# ---------------------------------------------------------------- NYU Depth v2

def test_nyu_png_list(tmp_path):
    root = tmp_path / "nyu"
    mm = RNG.integers(0, 65536, (24, 32)).astype(np.uint16)
    _rgb(root / "sync" / "kitchen_0028a" / "rgb_00045.jpg", 24, 32)
    _png(root / "sync" / "kitchen_0028a" / "sync_depth_00045.png", mm)
    _rgb(root / "sync" / "office_0003" / "rgb_00001.jpg", 24, 32)
    (root / "lists").mkdir()
    (root / "lists" / "nyudepthv2_train_files_with_gt.txt").write_text(
        "/kitchen_0028a/rgb_00045.jpg /kitchen_0028a/sync_depth_00045.png 518.8579\n"
        "/office_0003/rgb_00001.jpg None 518.8579\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = open_dataset(f"nyu:{root}", split="nyudepthv2_train_files_with_gt.txt")  # found one folder down
    assert any("skipped 1 lines" in str(w.message) for w in caught)
    assert ds.keys == ["kitchen_0028a_rgb_00045"] and not ds.eigen_crop
    s = ds[0]
    assert s.labels.get("depth").dtype == np.float32 and s.labels.get("seg") is None and s.labels.get("saliency") is None
    np.testing.assert_array_equal(s.labels.get("depth"), mm.astype(np.float32) / 1000)  # mm → metres exactly, 0 stays 0


def test_nyu_eigen_crop_and_10m_on_test_lists(tmp_path):
    root = tmp_path / "nyu"
    depth = np.full((480, 640), 5000, np.uint16)
    depth[100, 100] = 12000  # beyond 10 m
    _rgb(root / "official_splits" / "test" / "bathroom" / "rgb_00045.jpg", 480, 640)
    _png(root / "official_splits" / "test" / "bathroom" / "sync_depth_00045.png", depth)
    (root / "nyudepthv2_test_files_with_gt.txt").write_text("bathroom/rgb_00045.jpg bathroom/sync_depth_00045.png\n")
    d = open_dataset(f"nyu:{root}", split="nyudepthv2_test_files_with_gt.txt")[0].labels.get("depth")
    valid = np.zeros((480, 640), bool)
    valid[45:471, 41:601] = True
    valid[100, 100] = False
    assert (d[valid] == 5.0).all() and (d[~valid] == 0).all()
    resized = open_dataset(f"nyu:{root}", split="nyudepthv2_test_files_with_gt.txt", size=48)[0].labels.get("depth")
    assert resized.shape == (48, 48) and set(np.unique(resized)) <= {0.0, 5.0}  # nearest: crop before resize


def _labeled_mat(path, images, depths):
    """Write the labelled set as MATLAB v7.3 stores it: every array transposed (column-major)."""
    import h5py

    with h5py.File(path, "w") as f:
        f["images"] = np.stack([im.transpose(2, 1, 0) for im in images])  # (N, 3, W, H)
        f["depths"] = np.stack([d.T for d in depths])  # (N, W, H)


def test_nyu_labeled_mat_orientation_and_splits(tmp_path):
    images = [np.zeros((6, 8, 3), np.uint8) for _ in range(3)]
    depths = [np.full((6, 8), 1.0 + i, np.float32) for i in range(3)]
    images[2][1, 5] = (255, 10, 20)  # row 1, col 5
    depths[2][4, 7] = 9.5
    mat = tmp_path / "nyu_depth_v2_labeled.mat"
    _labeled_mat(mat, images, depths)
    ds = open_dataset(f"nyu:{mat}")
    assert ds.split == "all" and ds.keys == ["00001", "00002", "00003"]
    s = ds[2]
    assert s.image.shape == (6, 8, 3) and s.labels.get("depth").shape == (6, 8)
    assert tuple(s.image[1, 5]) == (255, 10, 20) and s.image.sum() == 285
    assert s.labels.get("depth")[4, 7] == np.float32(9.5) and s.labels.get("depth")[0, 0] == 3.0
    with pytest.raises(FileNotFoundError, match="splits.mat"):
        open_dataset(f"nyu:{mat}", split="train")
    savemat(tmp_path / "splits.mat", {"trainNdxs": np.array([[1], [3]]), "testNdxs": np.array([[2]])})
    assert open_dataset(f"nyu:{mat}").keys == ["00001", "00003"]  # default train once splits.mat exists
    test = NYULabeledDataset(mat, "test", eigen_crop=False)
    assert test.keys == ["00002"] and test[0].labels.get("depth")[0, 0] == 2.0
    with pytest.raises(ValueError, match="Eigen crop needs 480×640"):
        open_dataset(f"nyu:{mat}", split="test")[0]  # test frames get the evaluation crop by default


def test_nyu_errors(tmp_path):
    (tmp_path / "nyu").mkdir()
    with pytest.raises(ValueError, match="needs split=<file list>"):
        open_dataset(f"nyu:{tmp_path / 'nyu'}")
    with pytest.raises(FileNotFoundError, match="no such NYU file list"):
        open_dataset(f"nyu:{tmp_path / 'nyu'}", split="nyudepthv2_train_files_with_gt.txt")
    with pytest.raises(FileNotFoundError, match="nyu_depth_v2_labeled.mat"):
        open_dataset(f"nyu:{tmp_path / 'missing.mat'}")


# ---------------------------------------------------------------- generic folder

@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "mine"
    _rgb(root / "images" / "a.png", 24, 32)
    _rgb(root / "images" / "b.jpg", 30, 20)
    labels = {"a": _ids(24, 32, 2), "b": _ids(30, 20, 1)}
    depth_a = RNG.integers(0, 9000, (24, 32)).astype(np.uint16)
    depth_b = RNG.random((30, 20), dtype=np.float32) * 4
    depth_b[0, :] = 0
    for k, seg in labels.items():
        _png(root / "seg" / f"{k}.png", seg)
        _png(root / "saliency" / f"{k}.png", (seg == 255).astype(np.uint8) * 200)
    _png(root / "depth" / "a.png", depth_a)
    np.save(root / "depth" / "b.npy", depth_b)
    (root / "classes.txt").write_text("background\ndining table\npotted plant\n")
    (root / "palette.txt").write_text("0 0 0\n192 0 0\n0 64 0\n")
    return root, labels, {"a": depth_a.astype(np.float32) / 1000, "b": depth_b}


def test_folder_reads_every_label_kind(folder):
    root, labels, depths = folder
    ds = open_dataset(f"folder:{root}")
    assert ds.keys == ["a", "b"] and ds.classes == ["background", "dining table", "potted plant"]
    assert ds.palette[1] == [192, 0, 0]
    for s in ds:
        np.testing.assert_array_equal(s.labels.get("seg"), labels[s.key])
        np.testing.assert_array_equal(s.labels.get("saliency"), (labels[s.key] == 255) * 200)
        np.testing.assert_array_equal(s.labels.get("depth"), depths[s.key])


def test_folder_split_subfolder_and_missing_label(folder, tmp_path):
    root, _, _ = folder
    (tmp_path / "data").mkdir()
    root.rename(tmp_path / "data" / "val")  # <root>/<split>/images/…
    assert open_dataset(f"folder:{tmp_path / 'data'}", split="val").keys == ["a", "b"]
    with pytest.raises(FileNotFoundError, match="split 'train'"):
        open_dataset(f"folder:{tmp_path / 'data'}", split="train")
    (tmp_path / "data" / "val" / "depth" / "b.npy").unlink()
    with pytest.raises(FileNotFoundError, match="no depth file for image b"):
        open_dataset(f"folder:{tmp_path / 'data' / 'val'}")


# ---------------------------------------------------------------- size, captions, sources

def test_size_resizes_and_center_crops_every_field(voc, folder, tmp_path):
    _, labels = voc
    ds = open_dataset(f"voc:{tmp_path}", split="train_aug", size=16)
    assert ds.keys == VOCDataset(tmp_path).keys and ds.classes == VOC_CLASSES
    for s in ds:
        assert s.image.shape == (16, 16, 3) and s.labels.get("seg").shape == (16, 16)
        assert set(np.unique(s.labels.get("seg"))) <= set(np.unique(labels[s.key])) | {255}
    mine, _, depths = folder
    s = open_dataset(f"folder:{mine}", size=10)[1]  # 30 × 20 → 15 × 10 → rows 2:12
    assert s.image.shape == (10, 10, 3) and s.labels.get("saliency").shape == s.labels.get("depth").shape == (10, 10)
    assert set(np.unique(s.labels.get("depth"))) <= set(np.unique(depths["b"]))  # nearest: no blend of 0 = invalid


def test_captions_jsonl(folder, tmp_path):
    root, _, _ = folder
    captions = tmp_path / "captions.jsonl"
    captions.write_text(json.dumps({"key": "b", "caption": "a red chair by a window"}) + "\n")
    ds = open_dataset(f"folder:{root}", captions=captions)
    assert [s.caption for s in ds] == ["", "a red chair by a window"]
    captions.write_text("not json\n")
    with pytest.raises(ValueError, match="captions.jsonl:1: expected a JSON object"):
        open_dataset(f"folder:{root}", captions=captions)


def test_bare_path_is_the_files_layout_and_bad_sources_fail_in_one_line(tmp_path):
    writer = FilesWriter(tmp_path / "files")
    writer.write("000", image=np.zeros((8, 8, 3), np.uint8), meta={"caption": "toy"},
                 labels={"seg": np.ones((8, 8), np.uint8)})
    writer.close()
    ds = open_dataset(tmp_path / "files", size=4)
    assert ds.keys == ["000"] and ds[0].caption == "toy" and ds[0].labels.get("seg").shape == (4, 4)
    assert open_dataset(f"files:{tmp_path / 'files'}").keys == ["000"]
    cases = [("coco:/data/coco", ValueError, "unknown dataset kind 'coco'.*voc, duts, nyu, folder, files"),
             (str(tmp_path), ValueError, "no meta.jsonl.*KIND:PATH"),
             (f"duts:{tmp_path / 'nope'}", FileNotFoundError, "nope: no such folder"),
             (f"folder:{tmp_path / 'nope'}", FileNotFoundError, "nope: no such folder")]
    for source, error, message in cases:
        with pytest.raises(error, match=message) as info:
            open_dataset(source)
        assert "\n" not in str(info.value)


def test_cli_trains_and_evaluates_straight_from_a_dataset(duts, tmp_path):
    """`train --data duts:…` extracts (resized to 64²) then trains; `eval --data` scores a split."""
    from typer.testing import CliRunner

    from mmdiff_gen.cli import app

    root, _ = duts
    common = ["--model", "tiny-random", "--device", "cpu", "--dtype", "float32", "--size", "64"]
    res = CliRunner().invoke(app, ["train", "--data", f"duts:{root}", "--split", "TR", "--cache", str(tmp_path / "tr"),
                                   "--eval-data", f"duts:{root}", "--eval-split", "TE", "--eval-cache",
                                   str(tmp_path / "te"), "--task", "sal", "--out", str(tmp_path / "sal.safetensors"),
                                   "--epochs", "1", "--batch-size", "2", "--decoder-channels", "16", *common])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["eval", "--head", str(tmp_path / "sal.safetensors"), "--data", f"duts:{root}",
                                   "--split", "TE", "--cache", str(tmp_path / "te2"), "--json", str(tmp_path / "m.json"),
                                   *common])
    assert res.exit_code == 0, res.output
    assert set(json.loads((tmp_path / "m.json").read_text())) >= {"max_f", "mae"}
    res = CliRunner().invoke(app, ["extract", "--data", f"nope:{root}", "--out", str(tmp_path / "x"), *common])
    assert res.exit_code == 2 and "unknown dataset kind" in res.output


def test_shipped_prompt_files():
    """prompts/voc.txt names every VOC class ≥ 10 times; every file fits CLIP's 77 tokens comfortably."""
    from pathlib import Path

    from mmdiff_gen.cli._options import read_prompts

    root = Path(__file__).resolve().parent.parent / "prompts"
    files = {name: read_prompts(root / f"{name}.txt") for name in ("voc", "duts", "nyu")}
    assert {k: len(v) >= 150 for k, v in files.items()} == {"voc": True, "duts": True, "nyu": True}
    assert max(len(p.split()) for v in files.values() for p in v) < 60
    natural = {"diningtable": "dining table", "pottedplant": "potted plant", "tvmonitor": "tv monitor",
               "motorbike": "motorbike", "aeroplane": "aeroplane"}
    for cls in VOC_CLASSES[1:]:
        word = natural.get(cls, cls)
        assert sum(word in p.lower() for p in files["voc"]) >= 10, cls
