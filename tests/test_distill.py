"""Heads without a labelled dataset: transformers teachers built from tiny configs, and `distill` on the tiny
backbone (training during generation, resume within an epoch, the CLI)."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from mmdiff_gen.backbones.loading import BackboneNotFound, PickledWeights
from mmdiff_gen.backbones.teacher import Teacher
from mmdiff_gen.cli import app
from mmdiff_gen.heads.checkpoint import read_meta
from mmdiff_gen.io.state import load_state
from mmdiff_gen.jobs.distill import GeneratedFeatures, distill
from mmdiff_gen.train.trainer import TrainConfig

PROMPTS = ["a small red circle on the left", "a large blue square in the center", "a green star on the right"]
HEAD = (("dim", 16), ("decoder_channels", 16))
SAMPLING = {"num_inference_steps": 2, "height": 64, "width": 64}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Tiny random SegFormer (3 classes) and Depth Anything (relative) folders, saved as the Hub holds them."""
    from transformers import (DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor,
                              SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor)

    root = tmp_path_factory.mktemp("teachers")
    torch.manual_seed(0)
    labels = {0: "background", 1: "cat", 2: "dog"}
    seg = SegformerForSemanticSegmentation(SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], num_attention_heads=[1, 1],
        patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2], decoder_hidden_size=16, num_labels=3, id2label=labels,
        label2id={v: k for k, v in labels.items()}))
    seg.save_pretrained(root / "seg")
    SegformerImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "seg")
    vit = Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=28,
                       patch_size=14, out_features=["stage1", "stage2"], reshape_hidden_states=False)
    depth = DepthAnythingForDepthEstimation(DepthAnythingConfig(
        backbone_config=vit, reassemble_hidden_size=16, neck_hidden_sizes=[8, 16], fusion_hidden_size=16,
        head_hidden_size=8, reassemble_factors=[2, 1], patch_size=14))
    with torch.no_grad():
        depth.head.conv3.bias.fill_(1.0)  # a positive disparity everywhere (random ReLU outputs are often 0)
    depth.save_pretrained(root / "depth")
    DPTImageProcessor(size={"height": 28, "width": 28}, keep_aspect_ratio=False).save_pretrained(root / "depth")
    return root


def test_teachers_label_images_at_their_size(teachers):
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 48, 3), dtype=np.uint8)
    seg = Teacher.load(str(teachers / "seg"), "seg")
    out = seg(images)["seg"]
    assert seg.classes == ["background", "cat", "dog"] and out.shape == (2, 64, 48) and out.dtype == np.uint8
    assert out.max() < 3
    depth = Teacher.load(str(teachers / "depth"), "depth")
    d = depth(images)["depth"]
    # Depth Anything (relative) predicts disparity: turned into depth with a median of 1 per image.
    assert depth.depth_unit == "relative" and d.shape == (2, 64, 48) and d.dtype == np.float32
    assert np.allclose(np.median(d.reshape(2, -1), axis=1), 1.0, rtol=1e-3) and (d > 0).all()
    assert depth.identity()["config_sha256"] != seg.identity()["config_sha256"]


def test_teacher_refusals(teachers, tmp_path):
    with pytest.raises(ValueError, match="not a depth-estimation model"):
        Teacher.load(str(teachers / "seg"), "depth")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((teachers / "seg" / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(PickledWeights, match="pytorch_model.bin is a pickle"):
        Teacher.load(str(pickled), "seg")
    with pytest.raises(BackboneNotFound, match="hf download"):
        Teacher.load("nobody/no-such-teacher", "seg")


def test_generated_features_are_generation_passes(tiny, teachers):
    seg = Teacher.load(str(teachers / "seg"), "seg")
    spec_tasks = TrainConfig(tasks="seg").tasks
    from mmdiff_gen.capture import CaptureSpec

    src = GeneratedFeatures(tiny, PROMPTS, seg, CaptureSpec.for_tasks(spec_tasks), images_per_prompt=2,
                            sampling=SAMPLING, generate_batch_size=2)
    assert len(src) == 6 and src.manifest["classes"] == seg.classes and src.grid == (8, 8)
    assert src.record["distilled"]["teacher"]["name"] == str(teachers / "seg")
    batches = list(src.batches(4))
    assert [b["index"].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5]]
    b = batches[0]
    assert b["features"].shape[:3] == (4, 4, 4) and b["seg"].shape == (4, 64, 64) and b["seg"].dtype == torch.uint8
    assert b["concept_maps"].shape[:2] == (4, 4)
    # Each sample's seed is its own: a batch of other composition generates the same sample.
    again = next(src.batches(1, skip=1))
    torch.testing.assert_close(again["features"][0].float(), b["features"][1].float(), atol=2e-2, rtol=2e-2)


class _Dies:
    """A teacher that fails at its n-th call (a killed run; call 1 is the probe that sizes the head)."""

    def __init__(self, teacher, n):
        self.teacher, self.n, self.calls = teacher, n, 0
        self.tasks, self.classes, self.depth_unit = teacher.tasks, teacher.classes, teacher.depth_unit

    def identity(self):
        return self.teacher.identity()

    def __call__(self, images):
        self.calls += 1
        if self.calls == self.n:
            raise RuntimeError("killed")
        return self.teacher(images)


def test_distill_resumes_within_an_epoch(tiny, teachers, tmp_path):
    depth = Teacher.load(str(teachers / "depth"), "depth")
    cfg = TrainConfig(tasks="depth", epochs=1, batch_size=1, lr=1e-3, head=HEAD)
    whole = distill(tiny, PROMPTS, depth, cfg, tmp_path / "a" / "depth.safetensors", sampling=SAMPLING, save_every=1,
                    images_per_prompt=1)
    assert whole == {}  # no evaluation set
    with pytest.raises(RuntimeError, match="killed"):
        distill(tiny, PROMPTS, _Dies(depth, 4), cfg, tmp_path / "b" / "depth.safetensors", sampling=SAMPLING,
                save_every=1, images_per_prompt=1)
    assert load_state(tmp_path / "b" / ".depth.state.safetensors")["batch"] == 2  # two steps kept
    distill(tiny, PROMPTS, depth, cfg, tmp_path / "b" / "depth.safetensors", sampling=SAMPLING, save_every=1,
            images_per_prompt=1)
    a, b = (load_file(str(tmp_path / x / "depth.safetensors")) for x in "ab")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    meta = read_meta(tmp_path / "a" / "depth.safetensors")
    assert meta.depth_unit == "relative" and meta.metrics["train"]["distilled"]["prompts"] == 3
    with pytest.raises(ValueError, match="labels depth, not seg"):
        distill(tiny, PROMPTS, depth, TrainConfig(tasks="seg"), tmp_path / "c.safetensors", sampling=SAMPLING)


def test_cli_distill(teachers, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    runner = CliRunner()
    args = ["distill", "--model", "tiny-random", "--prompts", str(prompts), "--task", "seg", "--teacher",
            str(teachers / "seg"), "--steps", "2", "--size", "64", "--batch-size", "3", "--decoder-channels", "16",
            "--out", str(tmp_path / "heads" / "seg.safetensors")]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    meta = read_meta(tmp_path / "heads" / "seg.safetensors")
    assert meta.classes == ["background", "cat", "dog"] and (tmp_path / "heads" / "README.md").is_file()
    for bad, code in (([*args[:6], "seg,depth", *args[7:]], 2), ([*args[:8], str(tmp_path / "none"), *args[9:]], 2),
                      ([*args, "--size", "60"], 2)):
        r = runner.invoke(app, bad)
        assert r.exit_code == code and len(r.output.strip().splitlines()) == 1, r.output
