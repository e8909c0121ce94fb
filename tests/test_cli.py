"""The CLI through Typer's CliRunner: the feature dump and its bad-input lines."""

import json

import pytest
import torch
from typer.testing import CliRunner

from mmdiff_gen.cli import app
from mmdiff_gen.io.features import load_sample

runner = CliRunner()
TINY = ["--model", "tiny-random", "--size", "64", "--steps", "8", "--device", "cpu", "--dtype", "float32"]


def test_capture_writes_features_images_and_provenance(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n\n  a blue star on the left  \n")
    res = runner.invoke(app, ["capture", "--prompts", str(prompts), "--out", str(tmp_path / "o"), "--concepts", "seg",
                              "--batch-size", "2", "--max-sequence-length", "32", *TINY])
    assert res.exit_code == 0, res.output
    tensors, meta = load_sample(tmp_path / "o", "000000001")
    assert meta["prompt"] == "a blue star on the left" and meta["seed"] == 1
    assert tensors["features"].shape == (4, 4, 64, 32) and tensors["features"].dtype == torch.bfloat16
    assert tensors["concept_maps"].shape == (4, 4, 64)
    assert meta["sigmas"] == pytest.approx([0.78, 0.52, 0.26, 0.001], abs=1e-6)
    assert meta["extra_forwards"] == 1 and meta["backbone"]["name"] == "tiny-random"
    assert (tmp_path / "o" / "000000000.png").is_file()
    assert not list((tmp_path / "o").glob(".*tmp"))
    json.dumps(meta)


def test_bad_inputs_get_one_line_and_a_nonzero_exit(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    res = runner.invoke(app, ["capture", "--prompts", str(empty), "--out", str(tmp_path / "o"), *TINY])
    assert res.exit_code == 2 and "has no prompts" in res.output
    res = runner.invoke(app, ["capture", "--prompts", str(tmp_path / "missing.txt"), "--out", str(tmp_path), *TINY])
    assert res.exit_code == 2 and "does not exist" in res.output
    good = tmp_path / "p.txt"
    good.write_text("a red circle\n")
    res = runner.invoke(app, ["capture", "--prompts", str(good), "--out", str(tmp_path / "o"), "--sigmas", "0.5,2",
                              *TINY])
    assert res.exit_code == 2 and "sigmas must lie in (0, 1]" in res.output
    res = runner.invoke(app, ["inspect", "--model", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "no pipeline folder" in res.output
    assert len([ln for ln in res.output.splitlines() if ln.strip()]) == 1


def test_inspect_shows_the_contract():
    res = runner.invoke(app, ["inspect", "--model", "tiny-random", "--size", "64", "--steps", "12"])
    assert res.exit_code == 0, res.output
    assert "extra forward on the final latent" in res.output and "12 sampler steps + 1 extra" in res.output
