"""The dataset job on the tiny backbone: shards, members, resume, workers, failures, COCO and preview."""

import errno
import json
import tarfile

import numpy as np
import pytest
import torch

from mmdiff_gen.heads.checkpoint import HeadMismatch
from mmdiff_gen.io.dataset import GeneratedDataset
from mmdiff_gen.jobs.annotate import Annotator, head_files
from mmdiff_gen.jobs.dataset_job import FingerprintMismatch, GenerateJob, run_generate
from mmdiff_gen.jobs.plan import local_device, plan_samples, sample_seed, worker_identity
from mmdiff_gen.toy.world import CLASSES

from _helpers import make_heads

PROMPTS = ["a large red circle on the left", "a small blue star on the right", "a large yellow square in the center"]


@pytest.fixture(scope="module")
def annotator(tiny, tmp_path_factory):
    folder = make_heads(tiny, tmp_path_factory.mktemp("heads"))
    return Annotator(head_files(folder, ["seg", "saliency", "depth"]), tiny.identity())


def job(out, **kw):
    base = dict(out=out, tasks=("seg", "saliency", "depth"), images_per_prompt=2, batch_size=3, height=64, width=64,
                num_inference_steps=4, shard_size=4, seed=5)
    return GenerateJob(**{**base, **kw})


@pytest.fixture(scope="module")
def reference(tiny, annotator, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    report = run_generate(tiny, annotator, PROMPTS, job(out), progress=False)
    return out, report


def shard_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


def test_layout_members_and_metadata(reference):
    out, report = reference
    assert report.samples_written == 6 and report.shards_written == 2 and report.samples_failed == 0
    info = json.loads((out / "dataset.json").read_text())
    assert info["num_samples"] == 6 and info["num_shards"] == 2 and info["ignore_index"] == 255
    assert info["classes"] == list(CLASSES) and info["depth"]["scale"] == 1000.0 and len(info["fingerprint"]) == 64
    assert set(info["heads"]) == {"seg", "saliency", "depth"} and info["backbone"]["family"] == "flux"
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 4, "00001.tar": 2}
    stats = json.loads((out / "00001_stats.json").read_text())
    assert stats["written"] == 2 and [s["status"] for s in stats["samples"]] == ["ok", "ok"]
    with tarfile.open(out / "00000.tar") as tar:
        names = tar.getnames()
    keys = sorted({n.split(".")[0] for n in names})
    assert keys == [f"{i:09d}" for i in range(4)] and all(k.isdigit() for k in keys)
    suffixes = {n.partition(".")[2] for n in names}
    assert suffixes == {"jpg", "txt", "json", "seg.png", "sal.png", "depth.png"}
    assert len(names) == 4 * len(suffixes)  # every sample carries every member
    assert not list(out.glob(".*"))  # no temporaries left behind
    samples = list(GeneratedDataset(out))
    assert [s.prompt for s in samples] == [p for p in PROMPTS for _ in range(2)]
    s = samples[3]
    assert s.meta["prompt_index"] == 1 and s.meta["repeat"] == 1 and s.meta["seed"] == sample_seed(5, 1, 1)
    assert len(s.meta["sigmas"]) == 4 and set(s.meta["classes"]) <= set(CLASSES)
    assert s.image.shape == (64, 64, 3) and s.labels["seg"].dtype == np.uint8
    assert s.labels["depth"].dtype == np.float32 and s.labels["depth"].shape == (64, 64)


def test_webdataset_reader_snippet_is_lossless(reference, tiny, annotator):
    """The output format's webdataset reading (docs/output-format.md) decodes seg ids and 16-bit depth exactly as the heads produced them."""
    import io

    import webdataset as wds
    from PIL import Image

    out, _ = reference
    ds = wds.WebDataset(str(out / "{00000..00001}.tar"), shardshuffle=False).decode(
        wds.handle_extension("seg.png", lambda b: np.array(Image.open(io.BytesIO(b)))),
        wds.handle_extension("depth.png", lambda b: np.array(Image.open(io.BytesIO(b))).astype(np.float32) / 1000),
        "rgb8")
    first = next(iter(ds))
    assert first["__key__"] == "000000000" and first["jpg"].shape == (64, 64, 3)
    # Recompute the first sample's labels from scratch and compare.
    from mmdiff_gen.capture import generate

    gen = generate(tiny, [PROMPTS[0]], annotator.spec(), seeds=[sample_seed(5, 0, 0)], height=64, width=64,
                   num_inference_steps=4, guidance_scale=3.5)
    labels = annotator(gen.capture, (64, 64)).labels
    assert np.array_equal(first["seg.png"], labels["seg"][0].numpy())
    # Depth keeps full uint16 precision: within 1 mm of a batch-of-one recomputation (float sums vary with batch).
    assert np.abs(first["depth.png"] - labels["depth"][0].numpy()).max() <= 0.0015
    with tarfile.open(out / "00000.tar") as tar:
        raw = np.array(Image.open(tar.extractfile("000000000.depth.png")))
    assert raw.dtype == np.uint16 and np.array_equal(first["depth.png"], raw.astype(np.float32) / 1000)


def test_resume_noop_partial_and_fingerprint(tiny, annotator, reference, tmp_path):
    ref, _ = reference
    out = tmp_path / "ds"
    run_generate(tiny, annotator, PROMPTS, job(out), progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = run_generate(tiny, annotator, PROMPTS, job(out), progress=False)
    assert again.shards_skipped == 2 and again.shards_written == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("0000*")} == {k: v for k, v in before.items()
                                                                       if k.startswith("0000")}
    # A shard without its done marker is redone, and only that one.
    (out / "00001_stats.json").unlink()
    again = run_generate(tiny, annotator, PROMPTS, job(out), progress=False)
    assert (again.shards_skipped, again.shards_written) == (1, 1)
    assert shard_bytes(out) == shard_bytes(ref)  # tars are byte-reproducible
    # Other inputs in the same folder are refused unless --overwrite.
    with pytest.raises(FingerprintMismatch, match="other inputs"):
        run_generate(tiny, annotator, PROMPTS[:2], job(out), progress=False)
    rep = run_generate(tiny, annotator, PROMPTS[:2], job(out, overwrite=True), progress=False)
    assert rep.samples_written == 4 and not (out / "00001.tar").exists()
    assert len(GeneratedDataset(out)) == 4


def test_two_workers_equal_one(tiny, annotator, reference, tmp_path):
    ref, _ = reference
    out = tmp_path / "workers"
    reports = [run_generate(tiny, annotator, PROMPTS, job(out), rank=r, world_size=2, progress=False) for r in (0, 1)]
    # Run one after the other, worker 0 writes its shard, then takes over worker 1's, unclaimed and unfinished.
    assert [(r.shards_written, r.shards_taken_over) for r in reports] == [(2, 1), (0, 0)]
    assert shard_bytes(out) == shard_bytes(ref)
    a, b = list(GeneratedDataset(out)), list(GeneratedDataset(ref))
    assert [s.key for s in a] == [s.key for s in b]
    for x, y in zip(a, b):
        assert x.image_bytes == y.image_bytes and all(np.array_equal(x.labels[t], y.labels[t]) for t in x.labels)
    # Batch size changes neither which samples exist nor their seeds.
    assert [p.seed for p in plan_samples(PROMPTS, 2, 5)] == [s.meta["seed"] for s in b]


def test_failed_write_leaves_no_partial_shard(tiny, annotator, tmp_path, monkeypatch):
    import mmdiff_gen.io.shards as shards

    real = shards.ShardWriter.write

    def full_disk(self, key, members):
        if self.shard == 1 and self.count == 1:  # the disk fills up in the middle of the second shard
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, key, members)

    out = tmp_path / "full"
    monkeypatch.setattr(shards.ShardWriter, "write", full_disk)
    with pytest.raises(OSError, match="No space"):
        run_generate(tiny, annotator, PROMPTS, job(out, shard_size=4), progress=False)
    assert (out / "00000_stats.json").is_file() and len(list(GeneratedDataset(out, allow_partial=True))) == 4
    assert not (out / "00001.tar").exists() and not (out / "00001_stats.json").exists()
    assert not list(out.glob(".*tmp"))
    kept = shard_bytes(out)
    monkeypatch.setattr(shards.ShardWriter, "write", real)
    rep = run_generate(tiny, annotator, PROMPTS, job(out, shard_size=4), progress=False)
    assert (rep.shards_skipped, rep.shards_written) == (1, 1) and len(GeneratedDataset(out)) == 6
    assert shard_bytes(out)["00000.tar"] == kept["00000.tar"]


def test_a_failing_sample_is_recorded_and_retried(tiny, annotator, tmp_path, monkeypatch):
    from mmdiff_gen.jobs import dataset_job

    real = dataset_job._Runner._batch

    def flaky(self, samples):
        if any("star" in s.prompt for s in samples):
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(self, samples)

    monkeypatch.setattr(dataset_job._Runner, "_batch", flaky)
    out = tmp_path / "flaky"
    rep = run_generate(tiny, annotator, PROMPTS, job(out, images_per_prompt=1), progress=False)
    assert (rep.samples_written, rep.samples_failed) == (2, 1)
    stats = json.loads((out / "00000_stats.json").read_text())
    err = [s for s in stats["samples"] if s["status"] == "error"]
    assert err == [{"key": "000000001", "prompt_index": 1, "repeat": 0, "prompt": PROMPTS[1], "status": "error",
                    "error": "RuntimeError: CUDA out of memory (simulated)"}]  # the prompt kept: no sample shows it
    monkeypatch.setattr(dataset_job._Runner, "_batch", real)
    assert run_generate(tiny, annotator, PROMPTS, job(out, images_per_prompt=1), progress=False).shards_skipped == 1
    rep = run_generate(tiny, annotator, PROMPTS, job(out, images_per_prompt=1, retry_failed=True), progress=False)
    assert rep.samples_written == 3 and rep.samples_failed == 0


def test_files_format(tiny, annotator, reference, tmp_path):
    ref, _ = reference
    out = tmp_path / "files"
    run_generate(tiny, annotator, PROMPTS, job(out, format="files", image_format="png"), progress=False)
    assert sorted(p.name for p in (out / "seg").iterdir())[:2] == ["000000000.png", "000000001.png"]
    a, b = list(GeneratedDataset(out)), list(GeneratedDataset(ref))
    assert len(a) == 6 and all(np.array_equal(x.labels["seg"], y.labels["seg"]) for x, y in zip(a, b))


def test_coco_export_round_trip_and_preview(reference, tmp_path):
    from PIL import Image
    from pycocotools.coco import COCO

    from mmdiff_gen.io.coco import export_coco
    from mmdiff_gen.io.preview import contact_sheet

    src, _ = reference
    counts = export_coco(src, tmp_path / "coco")
    coco = COCO(str(tmp_path / "coco" / "annotations.json"))
    assert counts["images"] == 6 and len(coco.getCatIds()) == len(CLASSES) - 1
    samples = {s.key: s for s in GeneratedDataset(src)}
    for img in coco.dataset["images"]:
        seg = samples[img["file_name"].split(".")[0]].labels["seg"]
        rebuilt = np.zeros_like(seg)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=img["id"])):
            assert ann["iscrowd"] == 0 and ann["area"] == coco.annToMask(ann).sum()
            rebuilt[coco.annToMask(ann) > 0] = ann["category_id"]
        assert np.array_equal(rebuilt, np.where(seg == 0, 0, seg))
        assert (tmp_path / "coco" / "images" / img["file_name"]).read_bytes() == samples[img["file_name"][:9]].image_bytes
    assert sorted(p.name for p in (tmp_path / "coco").iterdir()) == ["annotations.json", "depth", "images", "labels",
                                                                    "saliency"]
    assert contact_sheet(src, tmp_path / "sheet.png", n=3) == 3
    assert Image.open(tmp_path / "sheet.png").size[0] == 4 * 128


def test_shard_order_and_default_shard_size():
    from mmdiff_gen._workers import shard_order
    from mmdiff_gen.jobs.plan import default_shard_size

    assert shard_order(7, 1, 3) == [1, 4, 6, 5, 3, 2, 0]  # own shards, then the others' from the end
    assert sorted(shard_order(20, 5, 8)) == list(range(20))
    assert (default_shard_size(512, 512), default_shard_size(1024, 1024), default_shard_size(64, 64)) == (256, 64, 1000)
    assert default_shard_size(4096, 4096) == 16


def test_worker_identity_from_flags_and_environment():
    assert worker_identity(env={})[:2] == (0, 1)
    assert worker_identity(1, 4, env={"RANK": "3", "WORLD_SIZE": "8"})[:2] == (1, 4)
    assert worker_identity(env={"RANK": "3", "WORLD_SIZE": "8"})[:2] == (3, 8)
    assert worker_identity(env={"SLURM_PROCID": "2", "SLURM_NTASKS": "4"})[:2] == (2, 4)
    assert worker_identity(None, 4, env={"RANK": "3", "WORLD_SIZE": "4"})[:2] == (3, 4)  # a flag overrides only itself
    assert worker_identity(2, None, env={"SLURM_PROCID": "0", "SLURM_NTASKS": "4"})[:2] == (2, 4)
    arr = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1"}
    assert worker_identity(env=arr)[:2] == (2, 3)
    with pytest.raises(ValueError, match="not in 0"):
        worker_identity(4, 4, env={})
    assert local_device("cuda", env={"LOCAL_RANK": "1"}) == "cuda:1"
    assert local_device("cuda", env={"SLURM_LOCALID": "3", "CUDA_VISIBLE_DEVICES": "3"}) == "cuda"
    assert local_device("cuda:0", env={"LOCAL_RANK": "1"}) == "cuda:0" and local_device("cpu", env={}) == "cpu"


class _MadeCurrent(Exception):
    pass


@pytest.mark.parametrize("command", ["generate", "capture"])
def test_each_worker_makes_its_gpu_current_before_loading(monkeypatch, tmp_path, command):
    """Under torchrun every rank starts on cuda:0: streams and events it creates (group offload's prefetch, capture's
    copies) would land there. The worker's GPU is made current first (a stub stands in for CUDA here)."""
    from typer.testing import CliRunner

    from mmdiff_gen.cli import app

    def made_current(dev):
        raise _MadeCurrent(dev)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", made_current)
    (tmp_path / "p.txt").write_text("a red circle\n")
    # generate checks its heads before choosing the GPU: openseg needs none
    extra = ["--tasks", "openseg", "--classes", "background,circle"] if command == "generate" else []
    res = CliRunner().invoke(app, [command, "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o"),
                                   "--device", "cuda", "--model", "tiny-random", *extra],
                             env={"LOCAL_RANK": "1", "WORLD_SIZE": "2", "RANK": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert isinstance(res.exception, _MadeCurrent) and res.exception.args == ("cuda:1",), res.output


def test_huggingface_datasets_reader_is_lossless(reference):
    """The `datasets` reading of docs/output-format.md: seg ids as uint8, depth as uint16 millimetres, bit for bit."""
    from datasets import load_dataset

    out, _ = reference
    ds = load_dataset("webdataset", data_files={"train": sorted(str(p) for p in out.glob("*.tar"))}, split="train",
                      cache_dir=str(out.parent / "hf_cache"))
    ours = list(GeneratedDataset(out))
    assert len(ds) == len(ours)
    for ex, s in zip(ds, ours):
        assert ex["__key__"] == s.key and ex["txt"] == s.prompt and ex["json"]["seed"] == s.meta["seed"]
        assert np.array_equal(np.array(ex["seg.png"]), s.labels["seg"])
        depth = np.array(ex["depth.png"])
        assert depth.dtype == np.uint16 and np.array_equal(depth.astype(np.float32) / 1000, s.labels["depth"])


def test_progress_prints_plain_lines_off_a_terminal(capsys):
    from mmdiff_gen.jobs._progress import JobProgress

    bar = JobProgress(4, "worker 1/2", interval=0.0)
    bar.add_time("backbone", 1.5)
    bar.advance(2)
    bar.advance(2)
    bar.close()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and lines[-1].startswith("[worker 1/2] 4/4 samples") and "backbone 1.5s" in lines[-1]


# --- integrity, overwrite, concurrent writers, settings (files other tools and many processes touch) -------------
def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_done_marker_vouches_for_bytes_and_damage_is_caught_and_redone(tiny, annotator, reference, tmp_path):
    from typer.testing import CliRunner

    from mmdiff_gen.cli import app
    from mmdiff_gen.io.dataset import IncompleteDataset, check_shards
    from mmdiff_gen.io.shards import file_digest
    from mmdiff_gen.io.store import LocalStore

    ref, _ = reference
    out = _copy(ref, tmp_path / "ds")
    st = json.loads((out / "00001_stats.json").read_text())
    vouched = {name: {k: f[k] for k in ("bytes", "sha256")} for name, f in st["files"].items()}
    assert vouched == {"00001.tar": dict(zip(("bytes", "sha256"), file_digest(LocalStore(out), "00001.tar")))}
    assert st["written"] == 2
    with open(out / "00001.tar", "r+b") as f:  # truncated: `truncate -s`, a copy cut short
        f.truncate(5000)
    with pytest.raises(IncompleteDataset, match="1 damaged .*00001.tar has 5000 bytes.*--allow-partial"):
        GeneratedDataset(out)
    assert len(GeneratedDataset(out, allow_partial=True)) == 4
    res = CliRunner().invoke(app, ["export", "--in", str(out), "--out", str(tmp_path / "coco")])
    assert res.exit_code == 1 and "damaged" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(app, ["preview", str(out), "--out", str(tmp_path / "p.png"), "--allow-partial"])
    assert res.exit_code == 0 and "00001" in res.output, res.output
    rep = run_generate(tiny, annotator, PROMPTS, job(out), progress=False)  # a re-run redoes the damaged shard only
    assert (rep.shards_damaged, rep.shards_written, rep.shards_skipped) == (1, 1, 1)
    assert shard_bytes(out) == shard_bytes(ref) and len(GeneratedDataset(out)) == 6
    # Same size, one byte changed: sizes pass, `verify` (every sha256) does not.
    data = bytearray((out / "00000.tar").read_bytes())
    data[700] ^= 0xFF
    (out / "00000.tar").write_bytes(bytes(data))
    info = json.loads((out / "dataset.json").read_text())
    assert check_shards(out, info).whole and not check_shards(out, info, full=True).whole
    (out / "00001_stats.json").unlink()
    res = CliRunner().invoke(app, ["verify", str(out)])
    assert res.exit_code == 1, res.output
    assert "damaged     00000: 00000.tar: sha256 differs" in res.output and "unfinished  00001" in res.output
    assert CliRunner().invoke(app, ["verify", str(ref)]).exit_code == 0
    # A re-run repairs it: the tar was written after its marker (its mtime moved), so its sha256 is checked.
    rep = run_generate(tiny, annotator, PROMPTS, job(out), progress=False)
    assert (rep.shards_damaged, rep.shards_written, rep.shards_skipped) == (1, 2, 0)
    assert shard_bytes(out) == shard_bytes(ref) and CliRunner().invoke(app, ["verify", str(out)]).exit_code == 0
    # A copy moves every mtime: shards whose bytes still match are kept (their markers record the new versions).
    import os

    copy = _copy(out, tmp_path / "copy")
    for p in copy.glob("*.tar"):
        os.utime(p, ns=(1, 1))
    rep = run_generate(tiny, annotator, PROMPTS, job(copy), progress=False)
    assert (rep.shards_damaged, rep.shards_written, rep.shards_skipped) == (0, 0, 2)
    assert json.loads((copy / "00000_stats.json").read_text())["files"]["00000.tar"]["version"] == "1"


def test_overwrite_killed_at_any_moment_never_mixes(tiny, annotator, reference, tmp_path, monkeypatch):
    """Whatever moment an --overwrite run dies, *.tar shows the old dataset whole or only new shards, and
    dataset.json describes them; a re-run finishes the new dataset and keeps the user's own files."""
    import os

    import mmdiff_gen.io.shards as shards
    from mmdiff_gen.jobs import dataset_job

    class Killed(BaseException):
        pass

    ref, _ = reference
    old = shard_bytes(ref)
    new_prompts = PROMPTS[::-1]

    def visible(out):
        """What `out/*.tar` shows: "old" (all of the old shards), "none", or "new" (only new shards)."""
        tars = shard_bytes(out) if out.is_dir() else {}
        if tars == old:
            return "old"
        if not tars:
            return "none"
        info = json.loads((out / "dataset.json").read_text())
        for name in tars:
            st = json.loads((out / name.replace(".tar", "_stats.json")).read_text())
            assert st["fingerprint"] == info["fingerprint"]  # a shard of the dataset dataset.json describes
        assert all(s.prompt in new_prompts for s in GeneratedDataset(out, allow_partial=True))
        return "new"

    real_rename, real_write, real_writer, real_indexes = (os.rename, dataset_job.write_json,
                                                          shards.ShardWriter.write, dataset_job.write_dataset_indexes)

    def rename_then_die(a, b):
        real_rename(a, b)
        raise Killed

    def die(*_):
        raise Killed

    def dataset_json_then_die(store, name, obj):
        real_write(store, name, obj)
        raise Killed

    def die_in_second_sample(self, key, members):
        if self.count == 1:
            raise Killed
        real_writer(self, key, members)

    def first_shard_then_die(*a):
        real_indexes(*a)
        raise Killed

    moments = [(os, "rename", rename_then_die), (shards, "_move_back", die),
               (dataset_job, "write_json", dataset_json_then_die),
               (shards.ShardWriter, "write", die_in_second_sample), (dataset_job, "write_dataset_indexes", first_shard_then_die)]
    seen = []
    for i, (owner, name, fake) in enumerate(moments):
        out = _copy(ref, tmp_path / str(i) / "ds")
        (out / "slurm-7.out").write_text("the user's log")
        with monkeypatch.context() as m:
            m.setattr(owner, name, fake)
            with pytest.raises(Killed):
                run_generate(tiny, annotator, new_prompts, job(out, overwrite=True), progress=False)
        seen.append(visible(out))
        with monkeypatch.context() as m:  # the next run finishes a dead process's half-done replacement
            m.setattr(shards, "_pid_alive", lambda pid: pid != os.getpid())
            shards.recover_replacements(out)
        assert visible(out) == seen[-1]
        rep = run_generate(tiny, annotator, new_prompts, job(out, overwrite=True), progress=False)
        assert rep.samples_failed == 0
        assert [s.prompt for s in GeneratedDataset(out)] == [p for p in new_prompts for _ in range(2)]
        assert (out / "slurm-7.out").read_text() == "the user's log"
        assert not list(out.parent.glob(".ds.replaced-*")) and not list(out.glob(".*"))
    assert seen == ["none", "none", "none", "none", "new"]  # the old shards went away in one step


def test_claims_keep_two_writers_apart(tiny, annotator, reference, tmp_path):
    import os
    import subprocess
    import sys

    from mmdiff_gen.io.shards import ShardClaim, _tmp_tag, remove_dead_temporaries

    ref, _ = reference
    out = tmp_path / "ds"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    host = _tmp_tag().rsplit(".", 1)[0]
    live_tmp = out / f".sizes.json.{host}.{os.getppid()}.tmp"  # a live process's file: never ours to delete
    dead_tmp = out / f".00001.tar.{host}.{dead_pid}.tmp"
    live_tmp.write_text("x")
    dead_tmp.write_text("x")
    remove_dead_temporaries(out)
    assert live_tmp.exists() and not dead_tmp.exists()
    live_tmp.unlink()
    # Shard 0 is held by a live process: this worker leaves it alone and writes the rest.
    busy = ShardClaim(out, 0)
    (out / busy.name).write_text(json.dumps({"host": host, "pid": os.getppid(), "token": "other", "since": 0}))
    rep = run_generate(tiny, annotator, PROMPTS, job(out), progress=False)
    assert (rep.shards_busy, rep.shards_written) == (1, 1) and not (out / "00000.tar").exists()
    # Its holder died: the claim is stale and taken over.
    (out / busy.name).write_text(json.dumps({"host": host, "pid": dead_pid, "token": "other", "since": 0}))
    rep = run_generate(tiny, annotator, PROMPTS, job(out), progress=False)
    assert (rep.shards_busy, rep.shards_written, rep.shards_skipped) == (0, 1, 1)
    assert shard_bytes(out) == shard_bytes(ref) and not list(out.glob(".*"))
    # Two claimants of one shard: only the first holds it.
    a, b = ShardClaim(out, 1), ShardClaim(out, 1)
    assert a.acquire() and not b.acquire() and a.held() and not b.held()
    a.release()
    assert b.acquire() and b.held()


def test_wids_loads_the_folder_unmodified(reference, tmp_path):
    import wids

    out, _ = reference
    index = json.loads((out / "shardindex.json").read_text())
    assert index["wids_version"] == 1
    assert [(s["url"], s["nsamples"]) for s in index["shardlist"]] == [("00000.tar", 4), ("00001.tar", 2)]
    ds = wids.ShardListDataset(str(out / "shardindex.json"), cache_dir=str(tmp_path / "cache"), transformations=[])
    ours = list(GeneratedDataset(out))
    assert len(ds) == len(ours) == 6
    for i in (5, 0, 3):  # random access, raw member bytes
        assert ds[i]["__key__"] == ours[i].key and ds[i][".txt"].read().decode() == ours[i].prompt
        assert ds[i][".jpg"].read() == ours[i].image_bytes


def test_failures_first_batch_all_failed_shards_and_device_errors(tiny, annotator, tmp_path, monkeypatch):
    import sys

    from mmdiff_gen.jobs import dataset_job

    real = dataset_job._Runner._batch
    calls = []

    def broken(self, samples):  # a systematic fault: every sample fails
        calls.append((len(samples), sys.exc_info()[0]))
        raise ValueError("height must be a multiple of 16 (simulated)")

    monkeypatch.setattr(dataset_job._Runner, "_batch", broken)
    out = tmp_path / "broken"
    with pytest.raises(RuntimeError, match="every sample of the first batch failed: ValueError: height"):
        run_generate(tiny, annotator, PROMPTS, job(out), progress=False)
    assert calls == [(3, None), (1, None), (1, None), (1, None)]  # retried one by one, outside the except block
    assert not list(out.glob("*_stats.json")) and not list(out.glob("*.tar"))  # nothing marked done

    def second_shard_fails(self, samples):  # the first shard works, every sample of the second fails
        if any(s.index >= 4 for s in samples):
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(self, samples)

    monkeypatch.setattr(dataset_job._Runner, "_batch", second_shard_fails)
    rep = run_generate(tiny, annotator, PROMPTS, job(out, batch_size=2), progress=False)
    assert (rep.shards_written, rep.shards_failed, rep.samples_failed) == (1, 1, 2)
    assert (out / "00000_stats.json").is_file() and not (out / "00001_stats.json").exists()

    def device_assert(self, samples):
        raise torch.AcceleratorError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(dataset_job._Runner, "_batch", device_assert)
    with pytest.raises(torch.AcceleratorError):
        run_generate(tiny, annotator, PROMPTS, job(out), progress=False)
    monkeypatch.setattr(dataset_job._Runner, "_batch", real)
    rep = run_generate(tiny, annotator, PROMPTS, job(out), progress=False)
    assert (rep.shards_skipped, rep.shards_written) == (1, 1) and len(GeneratedDataset(out)) == 6


@pytest.mark.parametrize("bad, match", [
    (dict(height=50), "multiple of 8"), (dict(height=100000), "multiple of 8"), (dict(true_cfg_scale=float("nan")),
     "finite"), (dict(guidance_scale=float("inf")), "finite"), (dict(min_quality=1.5), r"\[0, 1\]"),
    (dict(num_inference_steps=0), "≥ 1")])
def test_settings_are_refused_before_anything_is_written(tiny, annotator, tmp_path, bad, match):
    from mmdiff_gen.jobs.dataset_job import SettingsError

    with pytest.raises(SettingsError, match=match):
        run_generate(tiny, annotator, PROMPTS, job(tmp_path / "ds", **bad), progress=False)
    assert not (tmp_path / "ds").exists()


def test_pipelined_writing_equals_writing_in_the_main_thread(tiny, annotator, reference, tmp_path, monkeypatch):
    """Batch k is encoded on threads while batch k + 1 generates: the shards are the same bytes."""
    ref, _ = reference
    out = tmp_path / "threads"
    run_generate(tiny, annotator, PROMPTS, job(out, write_workers=2), progress=False)
    assert shard_bytes(out) == shard_bytes(ref)  # the reference wrote in the main thread (the CPU default)
    # One sample whose encoding fails is recorded and left out; the others are written, in order.
    from mmdiff_gen.jobs import dataset_job

    real = dataset_job.encode_sample

    def broken(image, prompt, meta, labels, **kw):
        if meta["key"] == "000000002":
            raise ValueError("cannot encode (simulated)")
        return real(image, prompt, meta, labels, **kw)

    monkeypatch.setattr(dataset_job, "encode_sample", broken)
    rep = run_generate(tiny, annotator, PROMPTS, job(tmp_path / "bad", write_workers=2), progress=False)
    assert (rep.samples_written, rep.samples_failed) == (5, 1)
    st = json.loads((tmp_path / "bad" / "00000_stats.json").read_text())
    assert [r["status"] for r in st["samples"]] == ["ok", "ok", "error", "ok"]
    assert st["samples"][2]["error"] == "ValueError while encoding: cannot encode (simulated)"
    assert [s.key for s in GeneratedDataset(tmp_path / "bad")] == ["000000000", "000000001", "000000003",
                                                                    "000000004", "000000005"]


def test_pipelined_writer_keeps_order_and_bounds_what_is_pending(tmp_path):
    import threading
    import time as _time

    from mmdiff_gen.io.shards import PipelinedWriter, ShardWriter

    live, peak, lock = [0], [0], threading.Lock()

    def encode(i):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        _time.sleep(0.002 * (i % 3))  # out-of-order completion
        with lock:
            live[0] -= 1
        return {"txt": str(i).encode()}

    with ShardWriter(tmp_path, 0, "webdataset") as w, PipelinedWriter(w, encode, workers=3, max_pending=2) as p:
        for i in range(30):
            p.put(f"{i:09d}", i, on_error=lambda e: None)
        p.finish()
        w.commit({})
    with tarfile.open(tmp_path / "00000.tar") as t:
        assert [t.extractfile(m).read() for m in t] == [str(i).encode() for i in range(30)]
    assert peak[0] <= 3  # never more encodes at once than threads; puts block when 2 are pending


def test_heads_on_double_stream_blocks_generate_and_do_not_mix(tiny, tmp_path):
    joint = make_heads(tiny, tmp_path / "joint", tasks=("seg", "depth"), blocks="joint")
    ann = Annotator(head_files(joint, ["seg", "depth"]), tiny.identity())
    assert ann.spec().blocks == "joint" and ann.spec().layers == tiny.default_layers(blocks="joint")
    report = run_generate(tiny, ann, PROMPTS[:1], job(tmp_path / "ds", tasks=("seg", "depth"), images_per_prompt=1),
                          progress=False)
    assert report.samples_written == 1
    ds = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert ds["heads"]["seg"]["blocks"] == "joint"
    single = make_heads(tiny, tmp_path / "single", tasks=("saliency",))
    with pytest.raises(HeadMismatch, match="different blocks"):
        Annotator({"seg": joint / "seg.safetensors", "saliency": single / "saliency.safetensors"}, tiny.identity())
