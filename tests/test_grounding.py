"""Seg4Diff's mask-alignment LoRA (`finetune-grounding`) on tiny FLUX and SD3: the alignment loss falls on a fixed
batch, training resumes, the LoRA file round-trips through diffusers' loader, scale 0 is the base model bit for bit,
and the LoRA enters the backbone identity (heads without it refused; openseg runs with it)."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mmdiff_gen.backbones import wrap_pipeline
from mmdiff_gen.backbones.loading import load_lora
from mmdiff_gen.backbones.tiny import build_tiny_flux, build_tiny_sd3
from mmdiff_gen.io.readers import Sample
from mmdiff_gen.toy.world import CLASSES, render_scene
from mmdiff_gen.train.grounding import GroundingConfig, GroundingLoss, add_lora, finetune_grounding

SAMPLES = [Sample(str(s), render_scene(s).image, "", {"seg": render_scene(s).seg}) for s in range(3)]


def _forward(bb, samples, seed=0):
    """The transformer's prediction for fixed noised inputs (no capture)."""
    loss = GroundingLoss(bb, GroundingConfig(), CLASSES)
    with torch.no_grad():
        return loss(samples, torch.tensor([0.5] * len(samples)), seed)


@pytest.mark.parametrize("build", [build_tiny_flux, build_tiny_sd3], ids=["flux", "sd3"])
def test_alignment_loss_falls_on_a_fixed_batch(build):
    bb = wrap_pipeline(build(seed=0), name="tiny")
    cfg = GroundingConfig(lr=1e-2, flow_weight=0.0)  # the alignment terms alone: every step pulls on them
    loss = GroundingLoss(bb, cfg, CLASSES)
    params = add_lora(bb, cfg, loss.layer)
    assert params and all(p.requires_grad and p.dtype == torch.float32 for p in params)
    assert not any(p.requires_grad for n, p in bb.transformer.named_parameters() if "lora_" not in n)
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    sigma = torch.tensor([0.5, 0.3])
    align = []
    for _ in range(25):
        terms = loss(SAMPLES[:2], sigma, noise_seed=0)
        align.append(float(cfg.focal_weight * terms["focal"] + cfg.dice_weight * terms["dice"]))
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
    assert align[-1] < 0.9 * align[0] and min(align[-5:]) < min(align[:5])


@pytest.mark.parametrize("build", [build_tiny_flux, build_tiny_sd3], ids=["flux", "sd3"])
def test_finetune_resumes_and_its_lora_round_trips(tmp_path, build):
    out = tmp_path / "lora"
    first = finetune_grounding(wrap_pipeline(build(seed=0), name="tiny"), SAMPLES, CLASSES, out,
                               GroundingConfig(steps=2, batch_size=2, lr=1e-3, warmup=1, checkpoint_every=1))
    record = json.loads((out / "grounding.json").read_text())
    assert len(record["history"]) == 2 and (out / "pytorch_lora_weights.safetensors").is_file()
    # A longer run in the same folder continues from the saved step (the first two steps are not redone).
    trained = wrap_pipeline(build(seed=0), name="tiny")
    again = finetune_grounding(trained, SAMPLES, CLASSES, out,
                               GroundingConfig(steps=3, batch_size=2, lr=1e-3, warmup=1, checkpoint_every=1))
    history = json.loads((out / "grounding.json").read_text())["history"]
    assert len(history) == 3 and history[:2] == record["history"] and again["first"] == first["first"]
    with pytest.raises(ValueError, match="other settings"):  # another rank in the same folder never mixes in
        finetune_grounding(wrap_pipeline(build(seed=0), name="tiny"), SAMPLES, CLASSES, out,
                           GroundingConfig(steps=4, batch_size=2, lr=1e-3, warmup=1, rank=8))

    # The file is a standard diffusers LoRA: a fresh pipeline loading it computes what the trained one does.
    loaded = wrap_pipeline(build(seed=0), name="tiny")
    load_lora(loaded.pipe, out)
    a, b = _forward(trained, SAMPLES[:1]), _forward(loaded, SAMPLES[:1])
    assert torch.allclose(a["flow"], b["flow"], rtol=1e-5) and torch.allclose(a["focal"], b["focal"], rtol=1e-5)
    assert loaded.identity()["lora"][0]["name"] == "lora"
    base = _forward(wrap_pipeline(build(seed=0), name="tiny"), SAMPLES[:1])
    assert not torch.allclose(base["focal"], a["focal"])  # the LoRA changed the attention


@pytest.mark.parametrize("build", [build_tiny_flux, build_tiny_sd3], ids=["flux", "sd3"])
def test_scale_zero_is_the_base_model_bit_for_bit(tmp_path, build):
    from mmdiff_gen.capture import CaptureSpec, generate

    out = tmp_path / "lora"
    finetune_grounding(wrap_pipeline(build(seed=0), name="tiny"), SAMPLES, CLASSES, out,
                       GroundingConfig(steps=1, batch_size=1, lr=1e-2, warmup=1))
    base = wrap_pipeline(build(seed=0), name="tiny")
    zero = wrap_pipeline(build(seed=0), name="tiny")
    load_lora(zero.pipe, out, scale=0.0)
    kw = dict(seeds=[3], num_inference_steps=2, height=64, width=64, output_type="np")
    spec = CaptureSpec(layers=(0,), sigmas=(0.5,))
    assert np.array_equal(generate(base, ["a red circle"], spec, **kw).images,
                          generate(zero, ["a red circle"], spec, **kw).images)
    (tmp_path / "weights.pth").write_bytes(b"a pickle")
    with pytest.raises(ValueError, match="safetensors only"):
        load_lora(zero.pipe, tmp_path / "weights.pth")


def test_cli_finetunes_and_generate_reads_the_lora(tmp_path):
    from mmdiff_gen.cli import app
    from mmdiff_gen.toy.render import write_scenes

    write_scenes(tmp_path / "data", 3, seed=0)
    runner = CliRunner()
    res = runner.invoke(app, ["finetune-grounding", "--data", str(tmp_path / "data"), "--model", "tiny-random",
                              "--out", str(tmp_path / "lora"), "--steps", "2", "--batch-size", "2", "--warmup", "1",
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    res = runner.invoke(app, ["generate", "--model", "tiny-random", "--prompts", str(prompts), "--tasks", "openseg",
                              "--classes", ",".join(CLASSES), "--lora", str(tmp_path / "lora"), "--lora-scale", "0.5",
                              "--out", str(tmp_path / "ds"), "--steps", "2", "--size", "64", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    lora = json.loads((tmp_path / "ds" / "dataset.json").read_text())["backbone"]["lora"]
    assert [(x["name"], x["scale"]) for x in lora] == [("lora", 0.5)]
    res = runner.invoke(app, ["finetune-grounding", "--data", str(tmp_path / "data"), "--model", "tiny-random",
                              "--out", str(tmp_path / "x"), "--steps", "0"])
    assert res.exit_code == 2 and "steps must be ≥ 1" in res.output


@pytest.mark.parametrize("build", [build_tiny_flux, build_tiny_sd3], ids=["flux", "sd3"])
def test_gradient_checkpointing_gives_the_same_gradients(build):
    grads = []
    for checkpointing in (False, True):
        bb = wrap_pipeline(build(seed=0), name="tiny")
        cfg = GroundingConfig(flow_weight=0.0)
        loss = GroundingLoss(bb, cfg, CLASSES)
        params = add_lora(bb, cfg, loss.layer)
        torch.manual_seed(1)
        for p in params:
            p.data.normal_(0, 0.1)  # B ≠ 0: gradients reach every LoRA weight
        if checkpointing:
            bb.transformer.enable_gradient_checkpointing()
        bb.transformer.train()
        loss(SAMPLES[:2], torch.tensor([0.5, 0.3]), noise_seed=0)["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in params]))
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-7)
