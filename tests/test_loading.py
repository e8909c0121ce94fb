"""Loading pipelines: local folders round-trip offline; missing weights give one actionable line."""

import pytest
import torch

from mmdiff_gen.backbones import BackboneNotFound, FluxBackbone, load_backbone


def test_missing_hub_weights_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneNotFound) as err:
        load_backbone("black-forest-labs/FLUX.1-dev", dtype=torch.float32, device="cpu")
    msg = str(err.value)
    assert "hf download black-forest-labs/FLUX.1-dev" in msg and "\n" not in msg


def test_folder_errors(tmp_path):
    with pytest.raises(BackboneNotFound, match="no model_index.json"):
        load_backbone(str(tmp_path), dtype=torch.float32, device="cpu")
    with pytest.raises(BackboneNotFound, match="no pipeline folder"):
        load_backbone(str(tmp_path / "nope"), dtype=torch.float32, device="cpu")
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(KeyError, match="supported: Flux2KleinPipeline, Flux2Pipeline, FluxPipeline"):
        load_backbone(str(tmp_path), dtype=torch.float32, device="cpu")


def test_local_folder_round_trip(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "tiny")
    bb = load_backbone(str(tmp_path / "tiny"), dtype=torch.float32, device="cpu")
    assert isinstance(bb, FluxBackbone)
    assert bb.dtype == torch.float32 and bb.device.type == "cpu"
    assert bb.identity()["config_sha256"] == FluxBackbone(tiny_pipe, "x").identity()["config_sha256"]
    assert not any(p.requires_grad for p in bb.transformer.parameters())
    assert len(bb.identity()["weights"]) == 16  # fingerprint of the weight files, recorded by heads


def test_pickled_weights_are_refused_naming_the_file(tmp_path):
    """A pipeline folder whose transformer is diffusion_pytorch_model.bin, a DINOv3 folder with pytorch_model.bin:
    one line naming the file, before anything reaches torch.load."""
    from typer.testing import CliRunner

    from mmdiff_gen.backbones.dino import DinoFeatures
    from mmdiff_gen.backbones.loading import PickledWeights
    from mmdiff_gen.backbones.tiny import build_tiny_flux
    from mmdiff_gen.cli import app

    build_tiny_flux(seed=0).save_pretrained(tmp_path / "pipe", safe_serialization=False)
    assert (tmp_path / "pipe" / "transformer" / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(PickledWeights, match=r"transformer/diffusion_pytorch_model\.bin is a pickle"):
        load_backbone(str(tmp_path / "pipe"), dtype=torch.float32, device="cpu")
    (tmp_path / "p.txt").write_text("a red circle\n")
    res = CliRunner().invoke(app, ["generate", "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o"),
                                   "--model", str(tmp_path / "pipe"), "--tasks", "openseg", "--classes", "bg,circle",
                                   "--device", "cpu"])
    assert res.exit_code == 2 and "diffusion_pytorch_model.bin is a pickle" in res.output, res.output
    assert len([ln for ln in res.output.splitlines() if ln.strip()]) == 1, res.output
    dino = tmp_path / "dino"
    dino.mkdir()
    (dino / "config.json").write_text("{}")
    (dino / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(PickledWeights, match="pytorch_model.bin is a pickle"):
        DinoFeatures.load(dino)
