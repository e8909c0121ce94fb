"""The ablation (`mmdiff-gen toy ablation`) on a seconds-long budget: rows, budgets, seeds, regions, α, resume."""

import json

import numpy as np
import pytest

from mmdiff_gen.toy.ablation import ABLATIONS, run_ablation
from mmdiff_gen.toy.data import boundary_mask

ROWS = ("double-stream, t ≈ 0 only", "multi-timestep + concept attention")


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    work = tmp_path_factory.mktemp("ablation")
    return work, run_ablation(work, train_scenes=4, val_scenes=3, budgets=(2, 1), seeds=(0, 1), rows=ROWS)


def test_every_row_task_and_budget_is_summarised_over_the_seeds(ablation):
    work, summary = ablation
    assert list(ABLATIONS)[0] == ROWS[0] and set(summary) == set(ROWS)
    for row in ROWS:
        for task, keys in (("seg", ("miou",)), ("saliency", ("max_f", "mae")), ("depth", ("abs_rel", "d1"))):
            by_budget = summary[row][task]
            assert set(by_budget) == {"1", "2"}
            for s in by_budget.values():
                assert s["seeds"] == [0, 1] and all(s[k]["n"] == 2 and np.isfinite(s[k]["std"]) for k in keys)
            assert "regions" in by_budget["2"] and "regions" not in by_budget["1"]  # analysed at the last budget
            assert set(by_budget["2"]["regions"]) == {"boundary", "interior"}
        assert set(summary[row]["seg"]["2"]["iou"]) <= set(["background", "circle", "square", "triangle", "star",
                                                             "ring", "cross"])
    # α: learned fusion only, one softmax over the 4 sigmas per layer, on every kind of token.
    alpha = summary[ROWS[1]]["seg"]["2"]["alpha"]
    assert set(alpha) == {"0", "1", "2", "3"}
    for layer in alpha.values():
        for weights in layer.values():
            assert len(weights) == 4 and abs(sum(weights) - 1) < 1e-6
    assert "alpha" not in summary[ROWS[0]]["seg"]["2"]
    # The double-stream row's heads read the joint blocks (a cache of their own).
    head = json.loads((work / "ablation" / "results" / "double_stream__t___0_only_seg_s0_e2.json").read_text())
    assert head["config"]["timesteps"] == [3] and (work / "train_cache_joint" / "cache.json").is_file()
    assert json.loads((work / "train_cache_joint" / "cache.json").read_text())["spec"]["blocks"] == "joint"


def test_a_rerun_trains_nothing(ablation):
    work, summary = ablation
    files = sorted((work / "ablation").rglob("*"))
    stamps = {p: p.stat().st_mtime_ns for p in files if p.name != "summary.json"}
    again = run_ablation(work, train_scenes=4, val_scenes=3, budgets=(1, 2), seeds=(0, 1), rows=ROWS)
    assert again == json.loads(json.dumps(summary))
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_boundary_mask_marks_pixels_near_a_class_change():
    seg = np.zeros((1, 8, 8), np.uint8)
    seg[0, :, 4:] = 1
    m = boundary_mask(seg, 2)
    assert m[0, 0].tolist() == [False, False, True, True, True, True, False, False]
