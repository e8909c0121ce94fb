"""The toy backbone's shipped heads: they load on the shipped backbone, the default `generate` uses them,
and the consistency protocol runs end to end."""

import json

import numpy as np
import pytest
import torch

from mmdiff_gen.backbones import load_backbone
from mmdiff_gen.backbones.loading import DEFAULT_HEADS
from mmdiff_gen.jobs.annotate import Annotator, head_files
from mmdiff_gen.toy.world import CLASSES

from _helpers import make_heads

TASKS = ["seg", "saliency", "depth"]


@pytest.fixture(scope="module")
def toy():
    return load_backbone("toy", dtype=torch.float32, device="cpu")


def test_shipped_heads_match_the_shipped_backbone(toy):
    ann = Annotator(head_files(DEFAULT_HEADS["toy"], TASKS), toy.identity())  # refuses a retrained backbone
    assert ann.classes == list(CLASSES) and ann.depth_unit == "metre"
    reported = json.loads((DEFAULT_HEADS["toy"] / "metrics.json").read_text())
    for h in ann.heads.values():
        task, = h.tasks
        assert h.meta.metrics == reported[task]  # the README's figures are the ones stored in the files
        assert h.meta.layers == list(toy.default_layers()) and len(h.meta.sigmas) == 4


def test_default_generate_uses_the_shipped_heads(tmp_path):
    from typer.testing import CliRunner

    from mmdiff_gen.cli import app
    from mmdiff_gen.io.dataset import GeneratedDataset

    prompts = tmp_path / "p.txt"
    prompts.write_text("a large red circle on the left\na small blue star on the right\n")
    res = CliRunner().invoke(app, ["generate", "--prompts", str(prompts), "--out", str(tmp_path / "ds"),
                                   "--device", "cpu", "--steps", "8"])
    assert res.exit_code == 0, res.output
    samples = list(GeneratedDataset(tmp_path / "ds"))
    assert len(samples) == 2 and set(samples[0].labels) == set(TASKS)
    assert samples[0].labels["seg"].shape == (64, 64) and samples[0].labels["depth"].max() <= 10


def test_consistency_protocol_runs(toy, tmp_path):
    from mmdiff_gen.toy.consistency import run_consistency

    heads = make_heads(toy, tmp_path)
    res = run_consistency(heads, n=2, batch_size=2)
    assert res["n"] == 2 and 0 <= res["seg"]["miou"] <= 100
    assert np.isfinite(res["saliency"]["mae"]) and np.isfinite(res["depth"]["abs_rel"])
