"""`mmdiff-gen toy unified` on a seconds-long budget: every configuration, metrics by task, the timing, resume."""

from mmdiff_gen.toy.unified import CONFIGS, run_unified


def test_every_configuration_is_trained_scored_and_timed_then_kept(tmp_path):
    report = run_unified(tmp_path, train_scenes=4, val_scenes=2, epochs=1, timing_batch=2)
    assert list(report["configs"]) == ["+".join(c) for c in CONFIGS]
    for tasks in CONFIGS:
        row = report["configs"]["+".join(tasks)]
        assert set(row["metrics"]) == set(tasks) and row["train_s"] > 0 and row["steps"] == 1
        assert (row["loss_weights"] is None) == (len(tasks) == 1)
    assert set(report["configs"]["seg+depth"]["metrics"]["depth"]) >= {"abs_rel", "rmse", "d1"}
    t = report["timing"]
    assert t["batch"] == 2 and t["generation_s"] > 0
    assert all(0 < t[k]["share"] < 1 for k in ("single-task heads", "unified head"))
    files = sorted((tmp_path / "unified").glob("*.safetensors"))
    stamps = {p: p.stat().st_mtime_ns for p in files}
    again = run_unified(tmp_path, train_scenes=4, val_scenes=2, epochs=1, timing_batch=2)
    assert {p: p.stat().st_mtime_ns for p in files} == stamps
    assert all(r["train_s"] is None for r in again["configs"].values())  # nothing retrained
    assert {k: r["metrics"] for k, r in again["configs"].items()} == {k: r["metrics"] for k, r in report["configs"].items()}
