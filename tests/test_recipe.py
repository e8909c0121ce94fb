"""`train --recipe`: the recipes as data, their cost plan (FLOPs on the meta device, cache bytes), and one run end to
end on toy renders — resumed with every stage skipped, and a failed stage leaving the earlier ones' outputs."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from mmdiff_gen.backbones import FluxBackbone, load_backbone
from mmdiff_gen.backbones.flops import config_backbone, forward_flops
from mmdiff_gen.backbones.flux import FLUX_DEV
from mmdiff_gen.backbones.loading import meta_backbone
from mmdiff_gen.cli import app
from mmdiff_gen.heads.checkpoint import read_meta
from mmdiff_gen.toy.render import write_scenes
from mmdiff_gen.train.feature_cache import FeatureCache
from mmdiff_gen.train.recipes import (CAPTIONER, RECIPES, SUSTAINED_FLOPS, TRAIN_FLOPS, PerImage, cost_table,
                                      get_recipe, per_image, plan_cost)

MiB = 2**20


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The test machine's two cores are shared with other jobs: two OpenMP threads that spin-wait on oversubscribed
    # cores made a toy head's training step 70× slower (13.4 s against 0.19 s with one thread).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_recipes_are_the_papers():
    voc, duts, nyu, toy = (RECIPES[n] for n in ("voc", "duts", "nyu", "toy"))
    for r, task in ((voc, "seg"), (duts, "saliency"), (nyu, "depth")):
        assert (r.tasks, r.head, r.kinds) == ((task,), task, (r.name,))
        assert (r.size, r.epochs, r.batch_size, r.lr, r.codec, r.captioner) == (512, 20, 16, 1e-4, "int8", CAPTIONER)
    assert CAPTIONER == "google/gemma-3-4b-it"
    assert voc.splits("voc:/d/VOC2012") == ("train_aug", "val")
    assert duts.splits("duts:/d/DUTS") == ("TR", "TE")
    assert nyu.splits("nyu:/d/nyu") == ("nyudepthv2_train_files_with_gt.txt", "nyudepthv2_test_files_with_gt.txt")
    assert nyu.splits("nyu:/d/nyu_depth_v2_labeled.mat") == ("train", "test")
    assert toy.tasks == ("seg", "saliency", "depth") and toy.head == "unified"
    assert (toy.size, toy.decoder_channels, toy.lr, toy.captioner) == (64, 32, 1e-3, "oracle")
    assert toy.train_config().head == (("decoder_channels", 32),) and voc.train_config().head == ()
    with pytest.raises(KeyError, match="choose from voc, duts, nyu, toy"):
        get_recipe("coco")


def test_cost_of_voc_at_flux_dev_numbers():
    # docs/training-heads.md's arithmetic: 86 TFLOP and 96 MiB (bf16) per 512² image at FLUX.1-dev; VOC train_aug 10 582, val 1 449.
    per = PerImage(forward_flops=86 * 10**12, head_flops=10**12, features=(4, 4, 1024, 3072), other_bytes=0)
    assert per.cache_bytes("bf16") == 96 * MiB
    assert per.cache_bytes("int8") == 48 * MiB + 4 * 4 * 1024 * 4  # 8 bits + a float32 scale per token
    voc = RECIPES["voc"]
    caption, ext_tr, ext_ev, train, ev = plan_cost(voc, per, train_images=10582, eval_images=1449, captioner="gemma")
    assert caption.flops is None and caption.images == 10582 + 1449
    assert ext_tr.flops == 10582 * 86e12 and ext_tr.disk == 10582 * per.cache_bytes("int8")  # the recipe's codec
    assert ext_tr.flops / SUSTAINED_FLOPS / 3600 == pytest.approx(2.03, abs=0.01)  # "≈ 2 h" (docs/training-heads.md)
    assert train.flops == 20 * 10582 * TRAIN_FLOPS * 1e12 and train.reads == 20 * ext_tr.disk and train.disk == 0
    assert ev.flops == 1449 * 1e12 and ev.reads == ext_ev.disk
    # No cache: no disk, and every epoch extracts its images again.
    lines = plan_cost(voc, per, train_images=10582, eval_images=1449, no_cache=True)
    assert [x.stage for x in lines] == ["train: 20 epochs, extracting each batch", "eval"]
    assert lines[0].flops == 20 * 10582 * (3e12 + 86e12) and sum(x.disk + x.reads for x in lines) == 0
    bf16 = dataclasses.replace(voc, codec="bf16")
    text = _render(cost_table(plan_cost(bf16, per, train_images=10582, eval_images=1449), title="voc"))
    assert "2.03 h" in text and "992 GiB" in text and "19.5 TiB" in text  # 10 582 × 96 MiB; read 20 times + eval


def test_flops_on_the_meta_device(tiny, tmp_path):
    one = forward_flops(tiny, rows=1, height=64, width=64)
    assert one > 0 and forward_flops(tiny, rows=3, height=64, width=64) == 3 * one
    assert forward_flops(tiny, rows=1, height=128, width=128) > 4 * one  # 4× the tokens, attention superlinear
    # A snapshot's JSON files are all a plan needs (`hf download M --include "*.json"`): no weights are read.
    snap = tmp_path / "FLUX.1-dev"
    for name, config in (("model_index.json", {"_class_name": "FluxPipeline", "vae": ["diffusers", "AutoencoderKL"],
                                               "transformer": ["diffusers", "FluxTransformer2DModel"]}),
                         ("transformer/config.json", {"_class_name": "FluxTransformer2DModel", **FLUX_DEV}),
                         ("vae/config.json", {"_class_name": "AutoencoderKL",
                                              "block_out_channels": [128, 256, 512, 512]})):
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).write_text(json.dumps(config))
    flux = meta_backbone(str(snap))
    assert flux.default_layers() == (4, 15, 26, 37) and flux.identity()["config_sha256"] == config_backbone(
        FluxBackbone, "FluxTransformer2DModel", FLUX_DEV, vae_scale_factor=8, name="x").identity()["config_sha256"]
    per = per_image(flux, RECIPES["voc"], labels={"seg": np.zeros((512, 512), np.uint8)}, num_classes=21)
    assert per.forward_flops / 1e12 == pytest.approx(86.0, abs=0.05)  # 4 noised copies, 512² (docs/training-heads.md)
    assert per.features == (4, 4, 1024, 3072) and per.head_flops > 0
    # features + the seg concept maps (float32) + the labels + the index
    assert per.cache_bytes("bf16") == 96 * MiB + 4 * 4 * 1024 * 4 + 512 * 512 + 8


def test_meta_backbone_is_the_loaded_one():
    meta, loaded = meta_backbone("toy"), load_backbone("toy", dtype=torch.float32, device="cpu")
    assert meta.identity() == loaded.identity()  # what a finished cache is checked against without loading
    assert next(meta.transformer.parameters()).device.type == "meta"
    assert meta.default_layers() == loaded.default_layers() and meta.feature_dim == loaded.feature_dim
    assert forward_flops(meta, rows=4, height=64, width=64) == forward_flops(loaded, rows=4, height=64, width=64)


def _render(table) -> str:
    console = Console(record=True, width=160)
    console.print(table)
    return console.export_text()


@pytest.fixture(scope="module")
def renders(tmp_path_factory):
    root = tmp_path_factory.mktemp("renders")
    write_scenes(root / "train", 6, seed=0)
    write_scenes(root / "val", 4, seed=5_000_000)
    return root


def _recipe(renders, work, out, *extra):
    return ["train", "--recipe", "toy", "--model", "toy", "--data", f"folder:{renders / 'train'}", "--eval-data",
            f"folder:{renders / 'val'}", "--work", str(work), "--out", str(out), "--epochs", "1", "--batch-size", "3",
            "--device", "cpu", *extra]


def test_dry_run_prints_the_plan(renders, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, _recipe(renders, tmp_path / "w", tmp_path / "h", "--dry-run"))
    assert res.exit_code == 0, res.output
    assert "train: folder:" in res.output and "(6 images)" in res.output and "(4 images)" in res.output
    for stage in ("caption (oracle)", "extract train", "extract eval", "train: 1 epochs", "GPU time", "total"):
        assert stage in res.output
    assert not (tmp_path / "w").exists() and not (tmp_path / "h").exists()
    res = runner.invoke(app, _recipe(renders, tmp_path / "w", tmp_path / "h", "--dry-run", "--no-cache"))
    assert res.exit_code == 0 and "extracting each batch" in res.output and "extract train" not in res.output


@pytest.mark.parametrize("args, says", [
    (["--recipe", "coco"], "unknown recipe 'coco'; choose from voc, duts, nyu, toy"),
    (["--recipe", "voc", "--data", "folder:x"], "recipe voc reads voc:PATH data"),
    (["--recipe", "toy", "--data", "folder:x"], "--eval-data"),
    (["--recipe", "toy", "--data", "folder:x", "--task", "seg"], "--task does not go with --recipe"),
    (["--recipe", "toy", "--data", "folder:x", "--eval-data", "folder:y"], "needs --work"),
    (["--recipe", "toy", "--data", "folder:x", "--epochs", "0", "--dry-run"], "epochs"),
    (["--task", "seg", "--cache", "c", "--out", "h.safetensors", "--work", "w"], "--work goes with --recipe"),
])
def test_recipe_usage_errors(args, says):
    res = CliRunner().invoke(app, ["train", *args])
    assert res.exit_code == 2 and says in " ".join(res.output.split()), res.output


@pytest.fixture(scope="module")
def toy_run(renders, tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    res = CliRunner().invoke(app, _recipe(renders, root / "work", root / "heads"))
    assert res.exit_code == 0, res.output
    return root, res.output


def test_toy_recipe_end_to_end(toy_run, renders):
    root, output = toy_run
    for line in ("caption: ran", "extract: ran", "train+eval: ran", "card: ran", "seg metrics", "depth metrics"):
        assert line in output
    head = root / "heads" / "unified.safetensors"
    meta = read_meta(head)
    assert meta.config.tasks == ("seg", "saliency", "depth") and meta.config.decoder_channels == 32
    assert set(meta.metrics) == {"seg", "saliency", "depth", "train"} and "miou" in meta.metrics["seg"]
    assert meta.metrics["train"]["eval"]["samples"] == 4 and meta.metrics["train"]["config"]["epochs"] == 1
    card = json.loads((root / "heads" / "config.json").read_text())
    assert list(card["heads"]) == ["unified.safetensors"]
    lines = (root / "work" / "captions_train.jsonl").read_text().splitlines()
    assert len(lines) == 6 and all(json.loads(x)["caption"] for x in lines)  # the oracle names each render's objects
    # the plan's disk arithmetic is what the cache holds
    cache = FeatureCache(root / "work" / "cache_train")
    sample = cache.manifest
    per = per_image(meta_backbone("toy"), get_recipe("toy"), labels=_labels(renders / "train"), num_classes=7)
    assert sample["codec"] == "int8" and per.cache_bytes("int8") == sample["bytes_per_sample"]


def _labels(folder):
    from mmdiff_gen.io.datasets import open_dataset

    return open_dataset(f"folder:{folder}")[0].labels


def test_second_run_skips_every_stage(toy_run, renders, monkeypatch):
    root, _ = toy_run
    head = root / "heads" / "unified.safetensors"
    before = head.stat().st_mtime_ns

    def refuse(*a, **k):
        raise AssertionError("nothing should load on a finished run")

    monkeypatch.setattr("mmdiff_gen.jobs.recipe.load_backbone", refuse)
    monkeypatch.setattr("mmdiff_gen.toy.captioner.OracleCaptioner.load", refuse)
    res = CliRunner().invoke(app, _recipe(renders, root / "work", root / "heads"))
    assert res.exit_code == 0, res.output
    for stage in ("caption", "extract", "train+eval"):
        assert f"{stage}: skipped" in res.output
    assert "card: ran" in res.output and "seg metrics" in res.output and head.stat().st_mtime_ns == before


def test_failed_stage_keeps_earlier_outputs(renders, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("training fell over")

    monkeypatch.setattr("mmdiff_gen.jobs.recipe.train_head", boom)
    args = _recipe(renders, tmp_path / "work", tmp_path / "heads")
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1 and "error: training fell over" in res.output
    assert len((tmp_path / "work" / "captions_eval.jsonl").read_text().splitlines()) == 4
    assert len(FeatureCache(tmp_path / "work" / "cache_train")) == 6  # finished (an unfinished cache refuses)
    assert len(FeatureCache(tmp_path / "work" / "cache_eval")) == 4
    monkeypatch.undo()
    res = CliRunner().invoke(app, args)  # resumed: only the failed stage and the card run
    assert res.exit_code == 0, res.output
    assert "caption: skipped" in res.output and "extract: skipped" in res.output and "train+eval: ran" in res.output
