"""The downstream protocol (`mmdiff-gen toy downstream`) on a seconds-long regime: every row, resume, another
downstream model reusing the heads and the generated set, refusals."""

import json
from dataclasses import replace

import numpy as np
import pytest
from typer.testing import CliRunner

from mmdiff_gen.cli import app
from mmdiff_gen.toy.downstream import DownstreamConfig, Labelled, label_agreement, run_downstream

TINY = DownstreamConfig(regimes=(3,), synthetic=4, eval_scenes=3, head_steps=1, steps=2, finetune_steps=1,
                        gen_batch=3, sample_steps=2, width=8, batch=2)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("downstream")
    return work, run_downstream(work, TINY, device="cpu")


def test_every_row_of_every_regime_is_scored(run):
    work, report = run
    assert report["config"]["regimes"] == [3]
    assert set(report["synthetic only, oracle labels"]) == {"seg", "saliency", "depth"}
    for n in ("3",):
        r = report["regimes"][n]
        rows = r["downstream"]
        sources = ("mmdiff", "t0", "pixel", "openseg", "mmdiff_filtered")
        assert set(rows) == {"real only"} | {f"synthetic only: {s}" for s in sources} | {
            f"synthetic → real: {s}" for s in (*sources, "oracle")}
        assert set(rows["synthetic only: openseg"]) == {"seg"}  # openseg labels segmentation only
        assert set(rows["synthetic → real: openseg"]) == {"seg", "saliency", "depth"}
        for row in rows.values():
            assert all(0 <= m["miou"] <= 100 for t, m in row.items() if t == "seg")
        assert set(r["heads on held-out renders"]) == {"mmdiff", "t0"}
        assert "miou" in r["heads on held-out renders"]["t0"]["seg"]
        assert set(r["labels vs oracle"]) == set(sources)
    # One generation pass (2 parts of gen_batch 3) shared by every regime; the filter keeps 3 of 4 samples.
    assert sorted(p.name for p in (work / "synthetic").glob("part_*.npz")) == ["part_000000.npz", "part_000003.npz"]
    part = np.load(work / "synthetic" / "part_000000.npz", allow_pickle=False)
    assert part["images"].shape == (3, 64, 64, 3) and part["mmdiff_3/score"].shape == (3,)
    assert "pixel_3/seg" not in part.files  # the pixel labeller belongs to the downstream settings' folder
    runs, = (work / "runs").iterdir()
    assert json.loads((runs / "report.json").read_text()) == report
    assert np.load(runs / "pixel_3.npz", allow_pickle=False)["seg"].shape == (4, 64, 64)


def test_a_rerun_resumes_without_retraining(run):
    work, report = run
    files = sorted(work.rglob("*.safetensors")) + sorted(work.rglob("*.npz"))
    stamps = {p: p.stat().st_mtime_ns for p in files}
    again = run_downstream(work, TINY, device="cpu")
    assert {p: p.stat().st_mtime_ns for p in files} == stamps  # nothing retrained, regenerated or rewritten
    strip = {k: v for k, v in again.items() if k != "seconds"}
    assert strip == {k: v for k, v in report.items() if k != "seconds"}


def test_another_downstream_model_reuses_the_heads_and_the_generated_set(run):
    work, report = run
    fixed = sorted(work.glob("heads_*/**/*.safetensors")) + sorted((work / "synthetic").glob("*.npz"))
    stamps = {p: p.stat().st_mtime_ns for p in fixed}
    wider = run_downstream(work, replace(TINY, width=16), device="cpu")
    assert {p: p.stat().st_mtime_ns for p in fixed} == stamps  # no head retrained, no image regenerated
    assert len(list((work / "runs").iterdir())) == 2 and wider["config"]["width"] == 16
    assert wider["regimes"]["3"]["labels vs oracle"]["mmdiff"] == report["regimes"]["3"]["labels vs oracle"]["mmdiff"]


def test_other_label_settings_in_the_same_folder_are_refused(run):
    work, _ = run
    res = CliRunner().invoke(app, ["toy", "downstream", "--work", str(work), "--regimes", "3,4", "--synthetic", "4"])
    assert res.exit_code == 1 and "other settings" in res.output and "regimes" in res.output, res.output
    res = CliRunner().invoke(app, ["toy", "downstream", "--regimes", "0"])
    assert res.exit_code == 2 and "regimes" in res.output


def test_label_agreement_is_perfect_against_itself():
    rng = np.random.default_rng(0)
    seg = rng.integers(0, 7, (2, 16, 16)).astype(np.uint8)
    data = Labelled(np.zeros((2, 16, 16, 3), np.uint8), seg, (seg > 0).astype(np.uint8) * 255,
                    rng.uniform(1, 8, (2, 16, 16)).astype(np.float32))
    agree = label_agreement(data, data)
    assert agree["seg"]["miou"] == 100 and agree["saliency"]["mae"] == 0 and agree["depth"]["abs_rel"] == 0
