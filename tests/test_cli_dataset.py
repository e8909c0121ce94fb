"""`generate`, `export`, `preview` through the CLI: bad input, signals and kill -9 on a real process."""

import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch
from typer.testing import CliRunner

from mmdiff_gen.backbones import load_backbone
from mmdiff_gen.cli import app

from _helpers import make_heads

run = CliRunner().invoke
FAST = ["--model", "tiny-random", "--size", "64", "--steps", "4", "--device", "cpu", "--dtype", "float32"]


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    return make_heads(load_backbone("tiny-random", dtype=torch.float32, device="cpu"), tmp_path_factory.mktemp("h"))


@pytest.fixture
def prompts(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("a large red circle on the left\n\n   \na small blue star on the right\n")
    return p


def test_generate_export_preview(heads, prompts, tmp_path):
    res = run(app, ["generate", "--prompts", str(prompts), "--out", str(tmp_path / "ds"), "--heads", str(heads),
                    "--tasks", "seg,sal", "-n", "2", *FAST])
    assert res.exit_code == 0, res.output
    info = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert info["num_samples"] == 4 and info["tasks"] == ["seg", "saliency"]  # blank lines skipped, sal = saliency
    with tarfile.open(tmp_path / "ds" / "00000.tar") as tar:
        assert {n.partition(".")[2] for n in tar.getnames()} == {"jpg", "txt", "json", "seg.png", "sal.png"}
    res = run(app, ["export", "--format", "coco", "--in", str(tmp_path / "ds"), "--out", str(tmp_path / "coco")])
    assert res.exit_code == 0, res.output
    assert len(json.loads((tmp_path / "coco" / "annotations.json").read_text())["images"]) == 4
    res = run(app, ["preview", str(tmp_path / "ds"), "--out", str(tmp_path / "sheet.png")])
    assert res.exit_code == 0 and (tmp_path / "sheet.png").is_file()


def test_bad_inputs_one_line_nonzero_exit(heads, prompts, tmp_path):
    def gen(*args, prompts_file=prompts, out="ds"):
        return run(app, ["generate", "--prompts", str(prompts_file), "--out", str(tmp_path / out), *FAST, *args])

    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    cases = [
        (gen("--heads", str(heads), prompts_file=empty), 2, "has no prompts"),
        (gen("--heads", str(heads), prompts_file=tmp_path / "nope.txt"), 2, "does not exist"),
        (gen("--heads", str(heads), prompts_file=tmp_path), 2, "is a folder"),
        (gen("--heads", str(heads), "--tasks", "seg,normals"), 2, "unknown task"),
        (gen("--heads", str(heads / "seg.safetensors"), "--tasks", "seg,depth"), 2, "no head for depth"),
        (gen("--heads", str(tmp_path / "missing")), 2, "heads not found"),
        (gen("--heads", str(prompts)), 2, "not a safetensors head file"),
        (gen("--heads", str(heads), "--seed", "-1"), 2, "--seed must be"),
        (gen("--heads", str(heads), "--image-format", "gif"), 2, "jpg or png"),
    ]
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the output folder should go")
    cases.append((gen("--heads", str(heads), out="blocker/ds"), 2, "cannot create output folder"))
    other = make_heads(load_backbone("tiny-random", dtype=torch.float32, device="cpu"), tmp_path / "other")
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(other / "seg.safetensors"), "pt") as f:
        header = dict(f.metadata())
    meta = json.loads(header["meta"])
    meta["backbone"]["config_sha256"] = "0123456789abcdef"
    header["meta"] = json.dumps(meta)
    save_file(load_file(str(other / "seg.safetensors")), str(other / "seg.safetensors"), metadata=header)
    cases.append((gen("--heads", str(other), "--tasks", "seg"), 2, "was trained on"))
    for res, code, text in cases:
        assert res.exit_code == code, (text, res.output)
        assert text in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "ds" / "00000.tar").exists()


def test_overlong_prompt_is_warned(heads, tmp_path):
    p = tmp_path / "long.txt"
    p.write_text("a large red circle " + "and a small blue star " * 10 + "\n")
    res = run(app, ["generate", "--prompts", str(p), "--out", str(tmp_path / "ds"), "--heads", str(heads),
                    "--tasks", "seg", *FAST])
    assert res.exit_code == 0, res.output
    assert "truncated" in res.output and "prompt 1" in res.output


def _spawn(args, env=None):
    # The child computes at this process's thread count: CPU sums, and so a sample's bytes, depend on it (a CI
    # machine showing more cores than conftest's two gave a resumed shard other bytes than the in-process run).
    code = (f"import sys, torch; torch.set_num_threads({torch.get_num_threads()}); from mmdiff_gen.cli import main; "
            "sys.argv = ['mmdiff-gen'] + sys.argv[1:]; main()")
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, **(env or {})})


def _wait_for(path, proc, timeout=120.0):
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout
        time.sleep(0.05)


def test_kill_and_sigterm_then_resume_equals_one_clean_run(heads, tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("\n".join(f"a large red circle on the left {i}" for i in range(8)))
    args = ["generate", "--prompts", str(p), "--heads", str(heads), "--tasks", "seg,depth", "--shard-size", "2",
            "--batch-size", "1", *FAST]
    ds = tmp_path / "ds"
    proc = _spawn(args + ["--out", str(ds)])
    _wait_for(ds / "00000_stats.json", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for tar in ds.glob("*.tar"):  # whatever moment the kill hit, every visible tar is whole
        with tarfile.open(tar) as t:
            assert len(t.getnames()) == 2 * 5  # two samples × (jpg, txt, json, seg.png, depth.png)
    proc = _spawn(args + ["--out", str(ds)])
    _wait_for(ds / "00002_stats.json", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and b"interrupted" in err and b"Traceback" not in err, err
    res = run(app, args + ["--out", str(ds)])
    assert res.exit_code == 0, res.output
    assert "already finished" in res.output
    clean = tmp_path / "clean"
    assert run(app, args + ["--out", str(clean)]).exit_code == 0
    assert {t.name: t.read_bytes() for t in ds.glob("*.tar")} == {t.name: t.read_bytes() for t in clean.glob("*.tar")}
    assert len(list(ds.glob("*.tar"))) == 4


def test_bad_settings_exit_2_before_any_folder_exists(heads, prompts, tmp_path):
    cases = [(["--size", "50"], "multiple of"), (["--size", "100000"], "multiple of"),
             (["--true-cfg", "nan"], "finite"), (["--guidance", "inf"], "finite"), (["--min-quality", "1.5"], "[0, 1]"),
             (["--world-size", "0"], "rank"), (["--steps", "0"], "≥ 1")]
    for args, text in cases:
        out = tmp_path / "never"
        res = run(app, ["generate", "--prompts", str(prompts), "--out", str(out), "--heads", str(heads), "--tasks",
                        "seg", *FAST, *args])
        assert res.exit_code == 2 and text in res.output and "Traceback" not in res.output, (args, res.output)
        assert len(res.output.strip().splitlines()) == 1 and not out.exists(), (args, res.output)


def _keys(folder):
    keys = []
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as t:
            keys += [n.split(".")[0] for n in t.getnames() if n.endswith(".json")]
    return keys


def test_two_identical_workers_on_one_folder(heads, tmp_path):
    """A duplicated rank or an overlapping SLURM step: both exit 0, every key exists exactly once."""
    p = tmp_path / "p.txt"
    p.write_text("\n".join(f"a small blue star on the right {i}" for i in range(8)))
    args = ["generate", "--prompts", str(p), "--heads", str(heads), "--tasks", "seg", "--shard-size", "2",
            "--batch-size", "1", "--out", str(tmp_path / "ds"), *FAST]
    procs = [_spawn(args), _spawn(args)]
    outs = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outs
    keys = _keys(tmp_path / "ds")
    assert sorted(keys) == [f"{i:09d}" for i in range(8)]  # each exactly once
    assert run(app, ["verify", str(tmp_path / "ds")]).exit_code == 0
    assert not list((tmp_path / "ds").glob(".*"))


def test_kill_9_during_overwrite_never_mixes_datasets(heads, tmp_path):
    p, q = tmp_path / "p.txt", tmp_path / "q.txt"
    p.write_text("\n".join(f"a large red circle on the left {i}" for i in range(6)))
    q.write_text("\n".join(f"a small white cross in the center {i}" for i in range(6)))
    base = ["generate", "--heads", str(heads), "--tasks", "seg", "--shard-size", "2", "--batch-size", "1", *FAST]
    ds = tmp_path / "ds"
    assert run(app, base + ["--prompts", str(p), "--out", str(ds)]).exit_code == 0
    old = {t.name: t.read_bytes() for t in ds.glob("*.tar")}
    old_fp = json.loads((ds / "dataset.json").read_text())["fingerprint"]
    proc = _spawn(base + ["--prompts", str(q), "--out", str(ds), "--overwrite"])
    t0 = time.time()
    while True:  # until the new dataset's first shard is done
        try:
            if json.loads((ds / "00000_stats.json").read_text())["fingerprint"] != old_fp:
                break
        except (OSError, ValueError):
            pass
        assert proc.poll() is None and time.time() - t0 < 120, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    tars = {t.name: t.read_bytes() for t in ds.glob("*.tar")}
    info = json.loads((ds / "dataset.json").read_text())
    assert tars != old and all(json.loads((ds / f"{n[:5]}_stats.json").read_text())["fingerprint"] == info["fingerprint"]
                               for n in tars)
    res = run(app, ["export", "--in", str(ds), "--out", str(tmp_path / "coco")])  # unfinished: refused
    assert res.exit_code == 1 and "unfinished" in res.output
    assert run(app, base + ["--prompts", str(q), "--out", str(ds), "--overwrite"]).exit_code == 0
    assert run(app, ["verify", str(ds)]).exit_code == 0 and sorted(_keys(ds)) == [f"{i:09d}" for i in range(6)]
