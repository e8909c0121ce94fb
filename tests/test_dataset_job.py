"""The dataset job on the tiny backbone: shards, members, resume, workers, failures, COCO and preview."""

import errno
import json
import tarfile

import numpy as np
import pytest
import torch

from mmdiff_gen.capture import CONCEPT_SETS, PAPER_SIGMAS
from mmdiff_gen.heads.checkpoint import HeadMeta, save_head
from mmdiff_gen.heads.model import HeadConfig, MMDiffHead
from mmdiff_gen.io.dataset import GeneratedDataset
from mmdiff_gen.jobs.annotate import Annotator, head_files
from mmdiff_gen.jobs.dataset_job import FingerprintMismatch, GenerateJob, run_generate
from mmdiff_gen.jobs.plan import local_device, plan_samples, sample_seed, worker_identity
from mmdiff_gen.toy.world import CLASSES, PALETTE

PROMPTS = ["a large red circle on the left", "a small blue star on the right", "a large yellow square in the center"]


def make_heads(backbone, folder, tasks=("seg", "saliency", "depth")):
    """Untrained but complete head files for `backbone` (the job's plumbing does not need trained weights)."""
    layers = list(backbone.default_layers())
    for task in tasks:
        cfg = HeadConfig(task=task, feature_dim=backbone.feature_dim, num_layers=len(layers), num_timesteps=4,
                         num_concepts=len(CONCEPT_SETS[task]), num_classes=len(CLASSES) if task == "seg" else 1,
                         dim=16, decoder_channels=16)
        torch.manual_seed(0)
        meta = HeadMeta(config=cfg, backbone=backbone.identity(), layers=layers, sigmas=list(PAPER_SIGMAS),
                        concepts=list(CONCEPT_SETS[task]), classes=list(CLASSES) if task == "seg" else [task],
                        palette=[list(c) for c in PALETTE], depth_unit="metre" if task == "depth" else "")
        save_head(folder / f"{task}.safetensors", MMDiffHead(cfg), meta)
    return folder


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
    """The README's webdataset snippet decodes seg ids and 16-bit depth exactly as the heads produced them."""
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
    assert [r.shards_written for r in reports] == [1, 1]
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
    assert (out / "00000_stats.json").is_file() and len(list(GeneratedDataset(out))) == 4
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
    assert err == [{"key": "000000001", "prompt_index": 1, "repeat": 0, "status": "error",
                    "error": "RuntimeError: CUDA out of memory (simulated)"}]
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
            assert ann["iscrowd"] == 0 and ann["area"] == (seg == ann["category_id"]).sum()
            rebuilt[coco.annToMask(ann) > 0] = ann["category_id"]
        assert np.array_equal(rebuilt, np.where(seg == 0, 0, seg))
        assert (tmp_path / "coco" / "images" / img["file_name"]).read_bytes() == samples[img["file_name"][:9]].image_bytes
    assert sorted(p.name for p in (tmp_path / "coco").iterdir()) == ["annotations.json", "depth", "images", "labels",
                                                                    "saliency"]
    assert contact_sheet(src, tmp_path / "sheet.png", n=3) == 3
    assert Image.open(tmp_path / "sheet.png").size[0] == 4 * 128


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


def test_huggingface_datasets_reader_is_lossless(reference):
    """The README's `datasets` snippet: seg ids as uint8, depth as uint16 millimetres, bit for bit."""
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
