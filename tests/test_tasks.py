"""The task registry: its rules, and one extra task registered here running through every layer — dataset
reader, feature cache, training, evaluation, the annotator, the dataset job, the reader, the CLI's parser
and the preview — with no other change to the code."""

import json
import tarfile

import numpy as np
import pytest
import typer

from mmdiff_gen import tasks
from mmdiff_gen.capture import CaptureSpec
from mmdiff_gen.toy.world import render_scene

EDGES = tasks.Task("edges", "probability", "edges.png", "edges", concepts=("edges", "contour"), aliases=("edge",))


def test_registry_rules():
    assert tasks.get("sal") is tasks.get("saliency") and tasks.canonical(["sal", "seg", "saliency"]) == ("saliency", "seg")
    assert tasks.trained() == ["seg", "saliency", "depth"] and tasks.class_task(["depth", "openseg", "seg"]) == "seg"
    assert tasks.get("depth").label_dtype == "float32" and tasks.get("depth").confidence is None
    assert tasks.get("seg").confidence == "seg_confidence" and not tasks.get("openseg").trained
    with pytest.raises(KeyError, match="known: seg, saliency \\(sal\\), depth, openseg"):
        tasks.get("normals")
    with pytest.raises(ValueError, match="is taken"):
        tasks.register(tasks.Task("sal", "probability", "x.png", "x"))
    with pytest.raises(ValueError, match="is taken"):
        tasks.register(tasks.Task("index", "probability", "x.png", "x"))  # a feature-cache tensor's name
    with pytest.raises(ValueError, match="member"):
        tasks.register(tasks.Task("mask", "probability", "sal.png", "mask"))
    with pytest.raises(ValueError, match="DeepLabV3\\+ predicts classes"):
        tasks.Task("normals", "positive", "n.png", "n", decoder="deeplab")
    with pytest.raises(ValueError, match="kind must be one of"):
        tasks.Task("normals", "vectors", "n.png", "n")


@pytest.fixture
def edges():
    tasks.register(EDGES)
    yield EDGES
    tasks.unregister("edges")


def _edge_map(seg: np.ndarray) -> np.ndarray:
    """(H, W) uint8: 255 where a pixel's class differs from its right or lower neighbour."""
    e = np.zeros(seg.shape, bool)
    e[:, :-1] |= seg[:, 1:] != seg[:, :-1]
    e[:-1] |= seg[1:] != seg[:-1]
    return np.where(e, 255, 0).astype(np.uint8)


def test_one_registered_task_runs_end_to_end(tiny, tmp_path, edges):
    from mmdiff_gen.cli._options import parse_tasks
    from mmdiff_gen.io.dataset import GeneratedDataset
    from mmdiff_gen.io.files import FilesWriter
    from mmdiff_gen.io.preview import contact_sheet
    from mmdiff_gen.jobs.annotate import Annotator, head_files
    from mmdiff_gen.jobs.dataset_job import GenerateJob, run_generate
    from mmdiff_gen.train.feature_cache import FeatureCache, extract_dataset
    from mmdiff_gen.train.trainer import TrainConfig, train_head

    assert parse_tasks("edge,seg") == ("edges", "seg") and CaptureSpec.for_tasks(["edges"]).concepts == EDGES.concepts
    # A dataset in the renders layout with only the new task's labels: its folder is the task's folder.
    data = tmp_path / "data"
    writer = FilesWriter(data)
    for s in range(4):
        scene = render_scene(s)
        writer.write(f"{s:03d}", image=scene.image, meta={"caption": scene.caption},
                     labels={"edges": _edge_map(scene.seg)})
    writer.close()
    assert sorted(p.name for p in data.iterdir()) == ["edges", "images", "meta.jsonl"]
    cache_dir = tmp_path / "cache"
    assert extract_dataset(tiny, f"folder:{data}", cache_dir, ["edges"], batch_size=2) == 4
    cache = FeatureCache(cache_dir)
    assert cache.manifest["labels"] == ["edges"] and cache.spec.concepts == ("edges", "contour")
    batch = next(cache.batches(2))
    assert batch["edges"].dtype.is_floating_point is False and batch["edges"].shape == (2, 64, 64)

    # Training and evaluation use the kind's decoder tail, loss and metrics.
    heads = tmp_path / "heads"
    cfg = TrainConfig(tasks="edge", epochs=1, batch_size=2, head=(("dim", 16), ("decoder_channels", 16)))
    metrics = train_head(cache, cfg, heads / "edges.safetensors", classes=[], eval_cache=cache)
    assert set(metrics) == {"s_measure", "max_f", "mae"} and 0 <= metrics["mae"] <= 1

    # The annotator and the dataset job write its member; the reader decodes it; the preview draws it.
    ann = Annotator(head_files(heads, ["edges"]), tiny.identity())
    assert ann.tasks == ["edges"] and ann.spec().concepts == ("edges", "contour")
    out = tmp_path / "ds"
    job = GenerateJob(out=out, tasks=("edges",), images_per_prompt=1, batch_size=2, height=64, width=64,
                      num_inference_steps=2, shard_size=2, min_quality=0.0)
    report = run_generate(tiny, ann, ["a red circle", "a blue star"], job, progress=False)
    assert report.samples_written == 2
    with tarfile.open(out / "00000.tar") as tar:
        assert {n.partition(".")[2] for n in tar.getnames()} == {"jpg", "txt", "json", "edges.png"}
    info = json.loads((out / "dataset.json").read_text())
    assert info["members"][-1] == "edges.png" and info["edges"]["encoding"] == "uint8 PNG, 0–255"
    samples = list(GeneratedDataset(out))
    assert [s.labels["edges"].shape for s in samples] == [(64, 64)] * 2 and samples[0].labels["edges"].dtype == np.uint8
    assert "edges_confidence" in samples[0].meta["quality"]  # its kind's confidence scores the sample
    assert contact_sheet(out, tmp_path / "sheet.png") == 2


def test_unknown_task_is_a_usage_error():
    from mmdiff_gen.cli._options import parse_tasks

    with pytest.raises(typer.BadParameter, match="unknown task 'edges'"):
        parse_tasks("seg,edges")
