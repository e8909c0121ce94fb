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
    with pytest.raises(KeyError, match="supported: FluxPipeline"):
        load_backbone(str(tmp_path), dtype=torch.float32, device="cpu")


def test_local_folder_round_trip(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "tiny")
    bb = load_backbone(str(tmp_path / "tiny"), dtype=torch.float32, device="cpu")
    assert isinstance(bb, FluxBackbone)
    assert bb.dtype == torch.float32 and bb.device.type == "cpu"
    assert bb.identity()["config_sha256"] == FluxBackbone(tiny_pipe, "x").identity()["config_sha256"]
    assert not any(p.requires_grad for p in bb.transformer.parameters())
    assert len(bb.identity()["weights"]) == 16  # fingerprint of the weight files, recorded by heads
