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


@pytest.fixture
def one_thread():
    """On 2 shared cores, a second thread waiting on a busy core made the smoke rows' tiny ops up to 30× slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


FLUX_ORDER = ["plain", "capture cpu", "capture gpu", "extract cpu",  # capture's cost at 1024²: what users need first
              "offload model", "offload group", "fp8 storage", "int8 storage",  # then the ways onto a smaller card
              "compile blocks", "compile blocks + offload group", "compile blocks + fp8 storage", "compile transformer",
              "offload sequential"]


def test_gpu_check_smoke_on_cpu(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.setenv("OUT", str(tmp_path))
    check = bench("gpu_check")
    rows = check.main(["--smoke", "--device", "cpu"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("pre-flight: missing or too old: ") and " | have: torch " in out[0]  # first, one line
    plan = check.planned(["toy", "flux1024"], None)  # the GPU run's order, whatever the order asked
    assert plan == [("flux1024", v) for v in FLUX_ORDER] + [
        ("toy", v) for v in ("plain", "capture cpu", "capture gpu", "compile blocks", "compile transformer")]
    ran = [(r.case, r.variant) for r in rows]  # --smoke: each kind of row once, in that order
    families = [(c, v) for c in ("flux2_1024", "qwen1024") for v in ("plain", "capture cpu")]
    assert [p for p in ran if p not in families] == [p for p in plan if p in ran] and len(ran) == 12 + 4
    assert ran[-6:-2] == families  # after FLUX's rows, before the toy's
    assert {v for _, v in ran} == set(FLUX_ORDER) - {"compile blocks + offload group", "compile blocks + fp8 storage",
                                                     "compile transformer"}
    status = {(r.case, r.variant): r.status for r in rows}
    assert status.pop(("flux1024", "offload sequential")).startswith("skipped: needs CUDA (")  # the CPU skips it
    if status[("flux1024", "int8 storage")] == "skipped: torchao absent":
        del status[("flux1024", "int8 storage")]
    assert set(status.values()) == {"ok"}, status
    diff = {(r.case, r.variant): r.diff for r in rows}
    assert diff[("flux1024", "plain")] == {"ref": "images"} and diff[("flux1024", "capture cpu")] == {
        "ref": "features", "images": 0.0}  # capture changes no pixel
    for v in ("capture gpu", "offload model", "offload group", "compile blocks"):  # aot_eager: exact
        assert diff[("flux1024", v)] == {"images": 0.0, "features": 0.0}, v
    for c, _ in families[1::2]:  # FLUX.2 and Qwen-Image: capture changes no pixel either
        assert diff[(c, "capture cpu")] == {"ref": "features", "images": 0.0}, c
    assert 0 < diff[("flux1024", "fp8 storage")]["images"] < 0.1 and diff[("flux1024", "fp8 storage")]["psnr"] > 30
    assert all(r.graphs > 0 for r in rows if r.variant.startswith("compile"))
    md = (tmp_path / "gpu_check.md").read_text()
    assert md.count("\n| ") == len(rows) + 1  # the header row and one row per variant
    assert "pre-flight: " in md and "Skipped: FLUX arch (smoke): offload sequential." in md


def test_gpu_check_reports_a_failing_row_and_runs_the_rest(monkeypatch, one_thread):
    check = bench("gpu_check")
    real = check.apply_runtime

    def broken_fp8(pipe, **kw):
        if kw["storage"] == "fp8":
            raise RuntimeError("simulated failure")
        return real(pipe, **kw)

    monkeypatch.setattr(check, "apply_runtime", broken_fp8)
    rows = check.main(["--smoke", "--device", "cpu", "--cases", "flux1024", "--only", "fp8 storage,offload group"])
    status = {r.variant: r.status for r in rows}
    assert list(status) == ["plain", "offload group", "fp8 storage"]
    assert status["fp8 storage"] == "FAILED: RuntimeError: simulated failure"
    assert status["plain"] == status["offload group"] == "ok"


def test_gpu_check_preflight_names_what_is_missing(monkeypatch, capsys, one_thread):
    check = bench("gpu_check")
    real = check._installed
    machine = {"diffusers": "0.41.0", "torchao": None}  # an old diffusers, no torchao
    monkeypatch.setattr(check, "_installed", lambda dist: machine[dist] if dist in machine else real(dist))
    with pytest.raises(SystemExit) as e:
        check.main(["--preflight-only", "--device", "cpu"])
    assert e.value.code == 2
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("pre-flight: FATAL, missing or too old: diffusers 0.41.0 (pyproject: >=0.42,<0.43); ")
    assert "torchao absent (skips int8 storage)" in line

    machine["diffusers"] = real("diffusers")  # only an optional package missing: its rows alone are skipped
    rows = check.main(["--smoke", "--device", "cpu", "--cases", "flux1024", "--only", "int8 storage,fp8 storage"])
    assert [(r.variant, r.status) for r in rows] == [
        ("plain", "ok"), ("fp8 storage", "ok"), ("int8 storage", "skipped: torchao absent")]
    rows = check.main(["--smoke", "--device", "cpu", "--cases", "flux1024", "--budget-s", "0"])
    assert len(rows) == len(check.SMOKE_ROWS["flux1024"]) and all(r.status.startswith("skipped: ") for r in rows)
    assert rows[0].status == "skipped: past the 0 s budget"


def test_compact_cache_smoke(tmp_path):
    res = bench("compact_cache").main(["--smoke", "--work", str(tmp_path)])
    assert res["bytes_per_sample"]["int8"] < res["bytes_per_sample"]["bf16"]
    assert all(0 < r["rel_l2"] < 0.05 for r in res["codecs"].values())
    assert set(res["step_s"]["total"]) == {"bf16", "int8", "no cache"} and set(res["retrained"]) == {"bf16", "int8"}
    assert res["step_s"]["head_step"] > 0 and all(v > 0 for v in res["step_s"]["data"].values())
    fg = res["flux_geometry"]  # one 512² FLUX.1-dev sample on disk: 96.3 MiB in bf16, half in 8 bits
    assert 96 * 2**20 < fg["bf16"]["file_bytes"] < 97 * 2**20 and fg["int8"]["file_bytes"] < 0.51 * fg["bf16"]["file_bytes"]


def test_ray_engine_smoke(tmp_path):
    for module in ("ray", "moto", "s3fs"):
        pytest.importorskip(module)
    res = bench("ray_engine").main(["--smoke", "--json", str(tmp_path / "ray.json")])
    assert res["local"]["shards"] == res["ray_local"]["shards"] == res["ray_s3"]["shards"] == 2
    assert res["identical"] == {"ray folder": True, "ray s3": True}  # one local process's bytes, by Ray, in S3
    b = res["bucket"]
    assert b["upload"]["bytes"] > 0 and b["upload"]["s"] > 0
    assert b["scan_fresh"]["finished"] == 0 and b["scan_finished"]["finished"] == 2
    assert b["scan_fresh"]["requests_per_shard"] >= 1 and b["indexes"]["requests_per_shard"] >= 1
    rows = res["arithmetic"]["gpus"]
    assert set(rows) == {8, 64, 512} and all(0 <= r["driver_gap_share"] < 1 for r in rows.values())
    assert (tmp_path / "ray.json").is_file()


def test_families_smoke(tmp_path):
    res = bench("families").main(["--smoke", "--json", str(tmp_path / "families.json")])
    assert set(res) == {"FLUX.2-dev", "Qwen-Image", "Wan2.1-T2V-1.3B"}
    for name in ("FLUX.2-dev", "Qwen-Image"):
        s = res[name]["sizes"][512]
        assert s["tokens"] == 1024 and s["extra_forwards"] == 1 and 0 < s["heads_share"] < 0.01
    s = res["Wan2.1-T2V-1.3B"]["clips"]["81×480×832"]  # 21 latent frames × 30 × 52 tokens
    assert s["tokens"] == 32760 and s["extra_forwards"] == 1 and 0 < s["heads_share"] < 0.01
