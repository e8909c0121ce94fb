"""One voice: the same failure gets the same exit code and one line in every command (the README's table, a row
per test): 0 success, 1 a runtime failure, 2 the caller's input, 128 + N a signal."""

import os
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from mmdiff_gen.cli import app

FAST = ["--model", "tiny-random", "--size", "64", "--steps", "2", "--device", "cpu", "--dtype", "float32"]


@pytest.fixture
def inputs(tmp_path):
    (tmp_path / "p.txt").write_text("a red circle\n")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "folder").mkdir()
    return tmp_path


def _unfinished(t):
    """A dataset.json whose one shard was never written."""
    import json

    (t / "ds").mkdir(exist_ok=True)
    info = {"num_shards": 1, "fingerprint": "f", "format": "webdataset", "tasks": ["seg"]}
    (t / "ds" / "dataset.json").write_text(json.dumps(info))
    return t / "ds"


def gen(t, *args):
    return ["generate", "--prompts", str(t / "p.txt"), "--out", str(t / "out"), *args]


CASES = {  # name: (arguments from the inputs folder, exit code, what the one line says)
    # 2: the caller's input — a bad option value …
    "unknown task": (lambda t: gen(t, "--tasks", "seg,foo"), 2, "Invalid value for '--tasks': unknown task 'foo'"),
    "no task": (lambda t: gen(t, "--tasks", ""), 2, "Invalid value for '--tasks': no task given"),
    "zero samples": (lambda t: gen(t, "-n", "0"), 2, "--images-per-prompt must be ≥ 1, got 0"),
    "not a number": (lambda t: gen(t, "--size", "big"), 2, "Invalid value for '--size'"),
    "size off the grid": (lambda t: gen(t, "--tasks", "openseg", "--classes", "bg,circle", *FAST[:2], "--size",
                                        "63", *FAST[4:]), 2, "--size 63: the image side must be a multiple of"),
    "missing option": (lambda t: ["generate", "--out", str(t / "out")], 2, "Missing option '--prompts'"),
    # … a missing input file or folder …
    "missing prompts": (lambda t: gen(t)[:2] + [str(t / "none.txt")] + gen(t)[3:], 2, "does not exist"),
    "missing dataset (verify)": (lambda t: ["verify", str(t / "none")], 2, "has no dataset.json"),
    "missing dataset (export)": (lambda t: ["export", "--in", str(t / "none"), "--out", str(t / "c")], 2,
                                 "has no dataset.json"),
    "missing dataset (preview)": (lambda t: ["preview", str(t / "none"), "--out", str(t / "p.png")], 2,
                                  "has no dataset.json"),
    "missing LoRA": (lambda t: gen(t, "--tasks", "openseg", "--classes", "bg,circle", "--lora", str(t / "none"),
                                   *FAST), 2, "--lora"),
    # … an input file of the wrong kind, in every command that reads it
    "bad head file (generate)": (lambda t: gen(t, "--heads", str(t / "bad.safetensors"), "--tasks", "seg", *FAST), 2,
                                 "is not a safetensors head file"),
    "bad head file (eval)": (lambda t: ["eval", "--head", str(t / "bad.safetensors"), "--data",
                                        f"folder:{t / 'folder'}", "--cache", str(t / "cache")], 2,
                             "is not a safetensors head file"),
    # … or names weights that are not there
    "model not cached": (lambda t: gen(t, "--model", "nobody/no-such-model", "--tasks", "openseg", "--classes",
                                       "bg,circle"), 2, "not in the local Hugging Face cache"),
    # 1: the work started and failed — e.g. reading a dataset that is not finished
    "unfinished dataset": (lambda t: ["export", "--in", str(_unfinished(t)), "--out", str(t / "c")], 1,
                           "1 unfinished"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_failure_is_one_line_with_its_exit_code(name, inputs, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(inputs / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args, code, says = CASES[name]
    res = CliRunner().invoke(app, args(inputs))
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == code and says in " ".join(res.output.split()), (name, res.output)
    assert len(lines) == 1 and lines[0].startswith("error: "), (name, res.output)
    assert not (inputs / "out").exists()  # nothing created


def test_ctrl_c_during_start_up_says_so_and_exits_130(inputs):
    """SIGINT while the command still imports torch: one line, 128 + 2, as a shell reports it."""
    cmd = [sys.executable, "-m", "mmdiff_gen.cli", *gen(inputs, "--tasks", "openseg", "--classes", "bg,c", *FAST)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    time.sleep(2.0)  # past the interpreter's own start, into the command's imports
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err, err


def test_the_bar_on_a_terminal_shows_rate_and_eta(monkeypatch):
    """On a terminal the bar says images/s and the time left from the first sample on (rich's own estimate needs
    updates within 30 s, longer than a FLUX batch, and stayed blank)."""
    import io

    from mmdiff_gen.jobs._progress import JobProgress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    bar = JobProgress(4, "generate")
    bar.advance(1)
    bar.advance(1)
    bar.close()
    text = err.getvalue()
    assert "2/4" in text and "img/s" in text and "eta 0:00:" in text, text


def test_capture_checks_its_sampling_before_loading(inputs):
    res = CliRunner().invoke(app, ["capture", "--prompts", str(inputs / "p.txt"), "--out", str(inputs / "out"),
                                   "--steps", "0", "--model", "tiny-random", "--device", "cpu"])
    assert res.exit_code == 2 and res.output.strip() == "error: --steps must be ≥ 1, got 0", res.output
