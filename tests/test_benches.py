"""Every benchmark's --smoke mode runs (so the benches cannot rot): in this process, through each script's main(argv)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch._dynamo

BENCH = Path(__file__).resolve().parent.parent / "bench"


def bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_capture_overhead_smoke():
    rows = bench("capture_overhead").main(["--smoke"])
    assert next(iter(rows)) == "plain" and len(rows) == 4
    assert all(r["min_s"] > 0 and r["peak_mib"] > 0 for r in rows.values())


def test_generate_job_smoke(tmp_path):
    res = bench("generate_job").main(["--smoke", "--json", str(tmp_path / "job.json")])
    calls = res["compare"]["calls"]
    assert calls["plain"] == 2 * 4  # true CFG: two transformer calls per step
    assert calls["generate (ours)"] > calls["plain"]  # + the forwards for target sigmas below the schedule's last
    assert res["throughput"][2] > 0 and res["memory"][2] > 0
    assert 0 < res["flops"]["heads_share"] < 0.01
    assert (tmp_path / "job.json").is_file()


def test_compile_capture_smoke():
    res = bench("compile_capture").main(["--smoke"])
    assert set(res["rows"]) == {"eager", "blocks", "transformer"}
    for mode in ("blocks", "transformer"):
        row = res["rows"][mode]
        assert row["graphs"] > 0
        assert row["max_abs_diff"] == {"images": 0.0, "features": 0.0, "concept_maps": 0.0}  # aot_eager: exact
    assert res["graphs_after_warmup"] == 0


def test_storage_agreement_smoke():
    pytest.importorskip("torchao")
    res = bench("storage_agreement").main(["--smoke"])
    assert set(res["vs_full"]) == {"fp8", "int8"}
    for a in res["vs_full"].values():
        assert 0.5 < a["seg_pixel_agreement"] <= 1 and 0 <= a["saliency_mae"] < 0.5 and a["depth_abs_rel"] < 0.5
        assert a["image_psnr_db"] > 20


def test_gpu_check_smoke_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    check = bench("gpu_check")
    rows = check.main(["--smoke", "--device", "cpu"])
    assert [(r.case.split()[0], r.variant) for r in rows] == (
        [("toy", v) for v in check.SMOKE_VARIANTS["toy"]] + [("tiny", v) for v in check.SMOKE_VARIANTS["flux1024"]])
    for r in rows:
        assert r.status == "ok" or r.status.startswith("FAILED"), r.status
        assert r.variant not in ("eager", "compile blocks") or r.status == "ok", r.status
    assert all(r.diff["images"] == 0 for r in rows if r.variant in ("compile blocks", "offload group"))
    md = (tmp_path / "gpu_check.md").read_text()
    assert md.count("\n| ") == len(rows) + 1  # the header row and one row per variant


def test_gpu_check_reports_a_failing_row_and_runs_the_rest(monkeypatch):
    check = bench("gpu_check")
    real = check.apply_runtime

    def broken_fp8(pipe, **kw):
        if kw["storage"] == "fp8":
            raise RuntimeError("simulated failure")
        return real(pipe, **kw)

    monkeypatch.setattr(check, "apply_runtime", broken_fp8)
    rows = check.main(["--smoke", "--device", "cpu", "--cases", "flux1024", "--only", "fp8 storage,offload group"])
    status = {r.variant: r.status for r in rows}
    assert list(status) == ["eager", "offload group", "fp8 storage"]
    assert status["fp8 storage"] == "FAILED: RuntimeError: simulated failure"
    assert status["eager"] == status["offload group"] == "ok"


def test_compact_cache_smoke(tmp_path):
    res = bench("compact_cache").main(["--smoke", "--work", str(tmp_path)])
    assert res["bytes_per_sample"]["int8"] < res["bytes_per_sample"]["bf16"]
    assert all(0 < r["rel_l2"] < 0.05 for r in res["codecs"].values())
    assert set(res["step_s"]["total"]) == {"bf16", "int8", "no cache"} and set(res["retrained"]) == {"bf16", "int8"}
    assert res["step_s"]["head_step"] > 0 and all(v > 0 for v in res["step_s"]["data"].values())
    fg = res["flux_geometry"]  # one 512² FLUX.1-dev sample on disk: 96.3 MiB in bf16, half in 8 bits
    assert 96 * 2**20 < fg["bf16"]["file_bytes"] < 97 * 2**20 and fg["int8"]["file_bytes"] < 0.51 * fg["bf16"]["file_bytes"]
