"""Backbone identity means the same weights: LoRA adapters and sampled file contents are part of it."""

import shutil

import pytest
import torch
from peft import LoraConfig

from mmdiff_gen.backbones import wrap_pipeline
from mmdiff_gen.backbones.loading import ASSETS, _weights_id
from mmdiff_gen.backbones.tiny import build_tiny_flux
from mmdiff_gen.heads.checkpoint import HeadMismatch
from mmdiff_gen.jobs.annotate import Annotator, head_files
from mmdiff_gen.jobs.dataset_job import GenerateJob, dataset_info

from _helpers import make_heads


def _lora(pipe, name="style"):
    torch.manual_seed(1)
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"],
                                            init_lora_weights="gaussian"), adapter_name=name)


def test_lora_enters_the_identity_and_heads_without_it_are_refused(tmp_path):
    pipe = build_tiny_flux(seed=0)
    bb = wrap_pipeline(pipe, name="tiny")
    files = head_files(make_heads(bb, tmp_path / "heads"), ["seg", "depth"])
    plain = Annotator(files, bb.identity())
    job = GenerateJob(out=tmp_path / "ds", tasks=("seg", "depth"), height=64, width=64)
    before = dataset_info(job, ["a red circle"], bb, plain, "float32")["fingerprint"]
    assert "lora" not in bb.identity()

    _lora(pipe)
    lora = bb.identity()["lora"]
    assert [(a["name"], a["scale"], a["fused"]) for a in lora] == [("style", 1.0, False)] and len(lora[0]["sha256"]) == 16
    with pytest.raises(HeadMismatch, match="trained with no LoRA; the loaded backbone carries 'style' at scale 1.0"):
        Annotator(files, bb.identity())
    # A resumed run with the LoRA is another dataset: its shards never mix with the plain run's.
    assert dataset_info(job, ["a red circle"], bb, plain, "float32")["fingerprint"] != before

    pipe.set_adapters(["style"], [0.5])
    assert bb.identity()["lora"][0]["scale"] == 0.5
    pipe.fuse_lora()
    assert bb.identity()["lora"][0]["fused"]
    pipe.unload_lora_weights()  # fused weights stay in the base weights: only the name is left to say so
    assert bb.identity()["lora"] == [{"name": "style", "fused": True}]
    with pytest.raises(HeadMismatch, match="'style' \\(fused\\)"):
        Annotator(files, bb.identity())


def test_the_same_lora_weights_give_the_same_identity_other_weights_do_not():
    a, b = build_tiny_flux(seed=0), build_tiny_flux(seed=0)
    _lora(a)
    _lora(b)
    same = wrap_pipeline(a, name="tiny").identity()["lora"] == wrap_pipeline(b, name="tiny").identity()["lora"]
    with torch.no_grad():
        next(p for n, p in b.transformer.named_parameters() if "lora_B.style" in n).add_(1e-3)
    assert same and wrap_pipeline(a, name="tiny").identity() != wrap_pipeline(b, name="tiny").identity()


def test_weights_id_samples_file_contents(tmp_path):
    folder = shutil.copytree(ASSETS / "toy", tmp_path / "toy")
    first = _weights_id(folder)
    assert first == _weights_id(ASSETS / "toy") and first.startswith("s")
    weights = sorted((folder / "transformer").glob("*.safetensors"))[0]
    data = bytearray(weights.read_bytes())
    for i in range(len(data) // 2, len(data), 1 << 15):  # retrained weights: same names and sizes, other bytes
        data[i] ^= 0x01
    weights.write_bytes(bytes(data))
    assert _weights_id(folder) != first
