"""Feature cache and head training end to end on a tiny backbone and a few toy-world scenes."""

import json

import numpy as np
import pytest
import torch

from mmdiff_gen.capture import CaptureSpec
from mmdiff_gen.heads.checkpoint import load_head
from mmdiff_gen.io.readers import FilesDataset
from mmdiff_gen.io.state import load_state
from mmdiff_gen.toy.render import write_scenes
from mmdiff_gen.toy.world import CLASSES
from mmdiff_gen.train.feature_cache import FeatureCache, build_cache
from mmdiff_gen.train.trainer import TrainConfig, train_head

HEAD = (("dim", 16), ("decoder_channels", 16))


@pytest.fixture(scope="module")
def caches(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    write_scenes(root / "train", 6, seed=0)
    write_scenes(root / "val", 3, seed=100)
    spec = CaptureSpec(concepts=("object", "background"), cross_attention=True)
    out = []
    for split in ("train", "val"):
        ds = FilesDataset(root / split)
        build_cache(tiny, ds, spec, root / f"{split}_cache", shard_size=4, batch_size=2)
        out.append(FeatureCache(root / f"{split}_cache"))
    return root, out[0], out[1]


def test_cache_layout_and_resume(tiny, caches):
    root, train, _ = caches
    assert len(train) == 6 and len(train.manifest["shards"]) == 2 and train.grid == (8, 8)
    b = next(train.batches(4))
    assert b["features"].shape == (4, 4, 4, 64, tiny.feature_dim) and b["features"].dtype == torch.bfloat16
    assert b["concept_maps"].shape == (4, 4, 2, 64) and b["cross_attention"].shape == (4, 4, 64)
    assert b["seg"].shape == (4, 64, 64) and b["depth"].dtype == torch.float32
    # Re-running a finished extraction does nothing; other settings in the same folder are refused.
    before = (root / "train_cache" / "shard_00000.safetensors").stat().st_mtime_ns
    ds = FilesDataset(root / "train")
    build_cache(tiny, ds, CaptureSpec(concepts=("object", "background"), cross_attention=True),
                root / "train_cache", shard_size=4, batch_size=2)
    assert (root / "train_cache" / "shard_00000.safetensors").stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="other data or settings"):
        build_cache(tiny, ds, CaptureSpec(), root / "train_cache", shard_size=4)


@pytest.mark.parametrize("task, side, timesteps", [("seg", "concepts", None), ("saliency", "cross", None),
                                                  ("depth", "none", (3,))])
def test_train_eval_checkpoint(tiny, caches, tmp_path, task, side, timesteps):
    _, train, val = caches
    cfg = TrainConfig(tasks=task, epochs=2, batch_size=4, side=side, timesteps=timesteps, head=HEAD)
    out = tmp_path / f"{task}.safetensors"
    metrics = train_head(train, cfg, out, classes=list(CLASSES), eval_cache=val, depth_unit="metre")
    key = {"seg": "miou", "saliency": "mae", "depth": "abs_rel"}[task]
    assert np.isfinite(metrics[key])
    model, meta = load_head(out, backbone=tiny.identity())
    assert meta.layers == [0, 1, 2, 3] and meta.metrics[key] == metrics[key]
    assert meta.sigmas == ([0.78, 0.52, 0.26, 0.001] if timesteps is None else [0.001])
    assert json.loads(json.dumps(meta.metrics)) == meta.metrics and meta.blocks == "feature"  # JSON as stored
    # Training resumes from its state file: re-running a finished run trains no further epoch.
    assert load_state(tmp_path / f".{task}.state.safetensors")["epoch"] == 2
    again = train_head(train, cfg, out, classes=list(CLASSES), eval_cache=val, depth_unit="metre")
    assert again[key] == metrics[key]


def test_resume_checks_settings_and_reads_older_states(caches, tmp_path):
    from mmdiff_gen.io.state import save_state

    _, train, val = caches
    cfg = TrainConfig(tasks="seg", epochs=1, batch_size=4, head=HEAD)
    out, state = tmp_path / "seg.safetensors", tmp_path / ".seg.state.safetensors"
    train_head(train, cfg, out, classes=list(CLASSES))
    with pytest.raises(ValueError, match=r"other settings \(lr\): train with them again, or delete it"):
        train_head(train, TrainConfig(tasks="seg", epochs=2, batch_size=4, head=HEAD, lr=1e-3), out,
                   classes=list(CLASSES))
    # A state written before multi-task heads (one "decoder.", no settings) resumes into today's head.
    st = load_state(state)
    old = lambda w: {(f"decoder.{k[len('decoders.seg.'):]}" if k.startswith("decoders.seg.") else k): v
                     for k, v in w.items()}
    save_state(state, {"model": old(st["model"]), "ema": old(st["ema"]), "opt": st["opt"], "epoch": 1})
    resumed = train_head(train, TrainConfig(tasks="seg", epochs=2, batch_size=4, head=HEAD), out,
                         classes=list(CLASSES), eval_cache=val)
    assert np.isfinite(resumed["miou"]) and load_state(state)["epoch"] == 2
    # A state that does not fit the head (another head size) is refused in one line, not torch's key list.
    save_state(state, {**load_state(state), "settings": {}, "model": {"w": torch.zeros(1)}})
    with pytest.raises(ValueError, match=r"does not fit this head \(.*\): delete it to start over$"):
        train_head(train, TrainConfig(tasks="seg", epochs=3, batch_size=4, head=HEAD), out, classes=list(CLASSES))


def test_cli_extract_train_eval(caches, tmp_path):
    from typer.testing import CliRunner

    from mmdiff_gen.cli import app

    root, _, _ = caches
    run = CliRunner().invoke
    res = run(app, ["extract", "--data", str(root / "train"), "--out", str(tmp_path / "c"), "--model", "tiny-random",
                    "--tasks", "seg", "--device", "cpu", "--dtype", "float32", "--batch-size", "3"])
    assert res.exit_code == 0, res.output
    res = run(app, ["train", "--cache", str(tmp_path / "c"), "--task", "seg", "--out", str(tmp_path / "h.safetensors"),
                    "--epochs", "1", "--batch-size", "3", "--decoder-channels", "16"])
    assert res.exit_code == 0, res.output
    res = run(app, ["eval", "--head", str(tmp_path / "h.safetensors"), "--cache", str(tmp_path / "c"),
                    "--json", str(tmp_path / "m.json")])
    assert res.exit_code == 0, res.output
    assert "miou" in json.loads((tmp_path / "m.json").read_text())
    res = run(app, ["train", "--cache", str(tmp_path / "c"), "--task", "normals", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "unknown task" in res.output


def test_cache_refuses_mixed_image_sizes(tiny, tmp_path):
    from mmdiff_gen.io.readers import Sample

    samples = [Sample(key="a", image=np.zeros((64, 64, 3), np.uint8)), Sample(key="b", image=np.zeros((32, 64, 3), np.uint8))]
    with pytest.raises(ValueError, match="pass --size"):
        build_cache(tiny, samples, CaptureSpec(), tmp_path / "c")


def test_a_cache_written_before_a_spec_field_existed_is_resumed(tiny, tmp_path):
    from mmdiff_gen.io.readers import Sample
    from mmdiff_gen.train.feature_cache import FeatureCache, build_cache

    rng = np.random.default_rng(0)
    samples = [Sample(f"{i}", rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), "a red circle",
                      labels={"seg": np.zeros((64, 64), np.uint8)}) for i in range(2)]
    spec = CaptureSpec(layers=(0,), sigmas=(0.5,))
    out = build_cache(tiny, samples, spec, tmp_path / "c", batch_size=2)
    manifest = json.loads((out / "cache.json").read_text())
    del manifest["spec"]["blocks"]  # as an older version wrote it
    (out / "cache.json").write_text(json.dumps(manifest))
    shard = out / "shard_00000.safetensors"
    before = shard.stat().st_mtime_ns
    build_cache(tiny, samples, spec, out, batch_size=2)  # resumed (nothing to do), not refused
    assert shard.stat().st_mtime_ns == before and FeatureCache(out).spec.blocks == "feature"


def test_one_head_for_three_tasks_trains_resumes_and_annotates(tiny, caches, tmp_path):
    """MMDiff App. C: one aggregation, a decoder per task, loss weights calibrated from early losses."""
    from mmdiff_gen.capture import generate
    from mmdiff_gen.jobs.annotate import Annotator, head_files

    _, train, val = caches
    cfg = TrainConfig(tasks=("seg", "sal", "depth"), epochs=2, batch_size=4, head=HEAD, calibration_steps=3)
    assert cfg.tasks == ("seg", "saliency", "depth")
    out = tmp_path / "heads" / "all.safetensors"
    metrics = train_head(train, cfg, out, classes=list(CLASSES), eval_cache=val, depth_unit="metre")
    assert set(metrics) == {"seg", "saliency", "depth"} and np.isfinite(metrics["depth"]["abs_rel"])
    model, meta = load_head(out, backbone=tiny.identity())
    assert meta.config.tasks == cfg.tasks and len(model.aggregators) == 4 and set(model.decoders) == set(cfg.tasks)
    weights = meta.metrics["train"]["loss_weights"]
    assert set(weights) == set(cfg.tasks) and all(w > 0 for w in weights.values())
    # Frozen after calibration: the state after epoch 2 holds the weights the head file records.
    state = load_state(tmp_path / "heads" / ".all.state.safetensors")
    assert state["loss_weights"]["count"] == 3 and state["loss_weights"]["weights"] == weights
    assert train_head(train, cfg, out, classes=list(CLASSES), eval_cache=val, depth_unit="metre") == metrics

    # A folder holding only the multi-task file serves every task from it, running it once per batch.
    files = head_files(tmp_path / "heads", ["seg", "depth"])
    assert files == {"seg": out, "depth": out}
    ann = Annotator(files, tiny.identity())
    assert ann.tasks == ["seg", "depth"] and len(ann.heads) == 1 and ann.classes == list(CLASSES)
    cap = generate(tiny, ["a red circle"], ann.spec(store_dtype="float32"), seeds=[0], num_inference_steps=2,
                   height=64, width=64).capture
    a = ann(cap, (64, 64))
    assert set(a.labels) == {"seg", "depth"} and a.labels["seg"].shape == (1, 64, 64)
    assert "seg_confidence" in a.quality[0] and "saliency_confidence" not in a.quality[0]


def test_multi_task_settings_are_checked(caches):
    _, train, _ = caches
    with pytest.raises(ValueError, match="zero-shot|no head is trained"):
        TrainConfig(tasks=("seg", "openseg"))
    with pytest.raises(ValueError, match="loss weights must name"):
        TrainConfig(tasks=("seg", "depth"), loss_weights=(("seg", 1.0),))
