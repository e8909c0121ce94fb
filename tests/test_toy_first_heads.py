"""The toy studies of heads without the paper's inputs, at smoke size (the product command runs them in full)."""

import json

from typer.testing import CliRunner

from mmdiff_gen.cli import app
from mmdiff_gen.toy.first_heads import distill_study


def test_caption_study_smoke(tmp_path):
    r = CliRunner().invoke(app, ["toy", "first-heads", "--work", str(tmp_path), "--val-scenes", "4", "--part",
                                 "captions", "--train-scenes", "6", "--epochs", "1", "--report", str(tmp_path / "c.json")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "c.json").read_text())
    assert set(res) == {"exact", "oracle", "empty"} and all(set(v) == {"seg", "saliency", "depth"} for v in res.values())
    # The caption files the heads were conditioned on: the oracle's reading and the empty prompt, one line per render.
    for source in ("oracle", "empty"):
        lines = [json.loads(x)["caption"] for x in (tmp_path / f"train_scenes_6.{source}.jsonl").read_text().splitlines()]
        assert len(lines) == 6 and all((c == "") == (source == "empty") for c in lines)
    assert CliRunner().invoke(app, ["toy", "first-heads", "--part", "nope"]).exit_code == 2


def test_distill_study_smoke(tmp_path):
    res = distill_study(tmp_path, ns=(4,), val_scenes=4, steps=1, batch=4, consistency_n=2, sample_steps=2)[4]
    assert res["epochs"] == 1 and set(res) == {"epochs", "real", "distilled"}
    assert set(res["distilled"]["held_out"]) == set(res["real"]["consistency"]) == {"seg", "saliency", "depth"}
