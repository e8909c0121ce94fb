"""Every reader checks what it reads; verify checks the indexes and repairs; export never mixes or half-writes."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mmdiff_gen.backbones import load_backbone
from mmdiff_gen.cli import app
from mmdiff_gen.io.dataset import DamagedShard, GeneratedDataset

from _helpers import make_heads

run = CliRunner().invoke
FAST = ["--model", "tiny-random", "--size", "64", "--steps", "4", "--device", "cpu", "--dtype", "float32"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """3 shards of 2 samples; each test works on a copy."""
    tmp = tmp_path_factory.mktemp("integrity")
    heads = make_heads(load_backbone("tiny-random", dtype=torch.float32, device="cpu"), tmp / "heads")
    (tmp / "p.txt").write_text("a large red circle on the left\na small blue star on the right\na white cross\n")
    args = ["generate", "--prompts", str(tmp / "p.txt"), "--out", str(tmp / "ds"), "--heads", str(heads),
            "--tasks", "seg,sal", "-n", "2", "--shard-size", "2", *FAST]
    res = run(app, args)
    assert res.exit_code == 0, res.output
    return tmp / "ds", args


@pytest.fixture
def ds(dataset, tmp_path):
    src, args = dataset
    out = tmp_path / "ds"
    shutil.copytree(src, out)
    return out, [a if a != str(src) else str(out) for a in args]


def flip_in_place(path, offset):
    """Change one byte without changing the file's size or modification time: bit rot, or a careful edit."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x20
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def member_offset(tar_path, suffix):
    import tarfile

    with tarfile.open(tar_path) as tar:
        info = next(m for m in tar.getmembers() if m.name.endswith(suffix))
        return info.offset_data


def test_readers_refuse_a_damaged_member_naming_the_shard(ds, tmp_path):
    out, _ = ds
    flip_in_place(out / "00001.tar", member_offset(out / "00001.tar", ".txt"))  # "a Xarge …": sizes still match
    with pytest.raises(DamagedShard, match="shard 00001 is damaged .*sha256 differs.*verify --repair"):
        list(GeneratedDataset(out))
    res = run(app, ["export", "--in", str(out), "--out", str(tmp_path / "coco")])
    assert res.exit_code == 1 and "shard 00001 is damaged" in res.output, res.output
    assert not (tmp_path / "coco").exists() and not list(tmp_path.glob(".coco*"))  # no half export
    res = run(app, ["preview", str(out), "--out", str(tmp_path / "p.png")])
    assert res.exit_code == 1 and "shard 00001 is damaged" in res.output and not (tmp_path / "p.png").exists()


def test_verify_repair_then_rerun_mends_what_verify_reports(ds):
    out, args = ds
    flip_in_place(out / "00000.tar", 700)
    shutil.copy(out / "00002.tar", out / "00007.tar")  # a stray: no shard of this dataset
    (out / "shardindex.json").unlink()
    (out / "sizes.json").write_text("{}")
    res = run(app, ["verify", str(out)])
    assert res.exit_code == 1
    for line in ("damaged     00000: 00000.tar: sha256 differs", "stray       00007.tar", "index       sizes.json lists 0",
                 "index       shardindex.json is missing", "verify --repair"):
        assert line in res.output, res.output
    # The mtime did not move: a plain re-run cannot see the damage (it checks sizes and versions, not every byte).
    res = run(app, ["verify", "--repair", str(out)])
    assert res.exit_code == 1 and "removed 2" in res.output and "write the 1 missing shard" in res.output, res.output
    assert not (out / "00007.tar").exists() and not (out / "00000_stats.json").exists()
    res = run(app, args)
    assert res.exit_code == 0 and "2 samples written in 1 shard(s), 2 already finished" in res.output, res.output
    res = run(app, ["verify", str(out)])
    assert res.exit_code == 0 and "all 3 shard(s) whole" in res.output, res.output


def test_a_rerun_rewrites_stale_indexes(ds):
    out, args = ds
    index = (out / "shardindex.json").read_text()
    (out / "sizes.json").write_text("{}")
    (out / "shardindex.json").unlink()
    assert run(app, ["verify", str(out)]).exit_code == 1
    res = run(app, args)
    assert res.exit_code == 0 and "3 already finished" in res.output, res.output
    assert (out / "shardindex.json").read_text() == index
    assert run(app, ["verify", str(out)]).exit_code == 0


def test_export_writes_a_new_folder_whole(ds, tmp_path):
    out, _ = ds
    dest = tmp_path / "coco"
    dest.mkdir()
    (dest / "images").mkdir()
    (dest / "images" / "stale.jpg").write_bytes(b"old")
    res = run(app, ["export", "--in", str(out), "--out", str(dest)])
    assert res.exit_code == 2 and "is not empty" in res.output and "--overwrite" in res.output, res.output
    res = run(app, ["export", "--in", str(out), "--out", str(dest), "--overwrite"])
    assert res.exit_code == 0, res.output
    coco = json.loads((dest / "annotations.json").read_text())
    assert sorted(p.name for p in (dest / "images").iterdir()) == sorted(i["file_name"] for i in coco["images"])
    assert len(coco["images"]) == 6 and not list(tmp_path.glob(".coco*"))


def test_options_that_would_do_nothing_or_cannot_work_are_refused_up_front(dataset, tmp_path):
    """--dino with heads trained without DINOv3 would change no byte; float16 FLUX saturates its features: both exit
    2 before a backbone loads, nothing created."""
    _, args = dataset
    out = tmp_path / "new"
    base = [a for a in args]
    base[base.index("--out") + 1] = str(out)
    res = run(app, [*base, "--dino", str(tmp_path / "dinov3")])
    assert res.exit_code == 2 and "--dino: none of these heads was trained with DINOv3" in res.output, res.output
    fp16 = [*base]
    fp16[fp16.index("--dtype") + 1] = "float16"
    res = run(app, fp16)
    assert res.exit_code == 2 and "--dtype float16: FLUX overflows float16" in res.output, res.output
    assert not out.exists()


def test_files_honour_the_umask(dataset):
    """Heads (safetensors writes 0600), shards and markers get what the umask gives a new file: colleagues on a
    shared cluster can read them."""
    import stat

    from mmdiff_gen._atomic import FILE_MODE

    mask = os.umask(0)
    os.umask(mask)
    assert FILE_MODE == 0o666 & ~mask
    ds, args = dataset
    heads = args[args.index("--heads") + 1]
    for f in [*sorted(Path(heads).glob("*.safetensors")), ds / "00000.tar", ds / "00000_stats.json", ds / "sizes.json"]:
        assert stat.S_IMODE(f.stat().st_mode) == FILE_MODE, f


def test_scoring_a_shipped_head_on_new_data_captures_what_it_reads(tmp_path):
    """eval --data fills its cache with exactly the head's layers, sigmas and concepts (the shipped seg head reads all
    ten toy concepts); a cache that lacks one is refused in one line naming it."""
    from mmdiff_gen.backbones.loading import BUILTIN_FOLDERS

    head = str(BUILTIN_FOLDERS["toy"].parent / "toy_heads" / "seg.safetensors")
    assert run(app, ["toy", "render", "--n", "4", "--out", str(tmp_path / "renders")]).exit_code == 0
    data = f"folder:{tmp_path / 'renders'}"
    res = run(app, ["eval", "--head", head, "--data", data, "--cache", str(tmp_path / "c1"), "--device", "cpu",
                    "--json", str(tmp_path / "m.json")])
    assert res.exit_code == 0, res.output
    assert 0 <= json.loads((tmp_path / "m.json").read_text())["miou"] <= 100
    res = run(app, ["extract", "--data", data, "--tasks", "seg", "--out", str(tmp_path / "c2"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    res = run(app, ["eval", "--head", head, "--cache", str(tmp_path / "c2"), "--device", "cpu"])
    assert res.exit_code == 2 and "(missing: salient, contour, depth, surface, near, far)" in res.output, res.output
