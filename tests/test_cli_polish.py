"""The CLI as a whole: lazy help, --version, readable option help, quiet libraries, usage errors, exit codes."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from mmdiff_gen import __version__
from mmdiff_gen.cli import app
from mmdiff_gen.cli._options import read_prompts

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _flat(text: str) -> str:
    """Help text with its line wrapping undone."""
    return " ".join(text.split())


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def test_help_of_every_command_imports_no_heavy_library():
    code = """
import sys
import typer
from typer.testing import CliRunner
from mmdiff_gen.cli import app

def paths(cmd, prefix=()):
    yield prefix
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from paths(sub, prefix + (name,))

runner = CliRunner()
for p in paths(typer.main.get_command(app)):
    res = runner.invoke(app, [*p, "--help"])
    assert res.exit_code == 0 and "Usage:" in res.output, (p, res.output)
print(" ".join(m for m in ("torch", "diffusers", "transformers", "accelerate") if m in sys.modules))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "", f"imported while building help: {res.stdout}"


def test_version():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output == f"mmdiff-gen {__version__}\n"


def test_option_help_keeps_bracketed_text_and_shows_defaults():
    res = runner.invoke(app, ["generate", "--help"])
    assert res.exit_code == 0
    text = _flat(res.output)
    assert "[backbone's recommendation, else 28]" in text and "[the backbone's shipped heads]" in text
    assert "[default: seg,saliency,depth]" in text and "[default: auto]" in text
    assert "lines starting with # are skipped" in text
    res = runner.invoke(app, ["toy", "consistency", "--help"])  # the toy sub-app too
    assert res.exit_code == 0 and "openseg's attention block [the backbone's]" in _flat(res.output)
    res = runner.invoke(app, ["train", "--help"])
    assert "[default: 0.0001]" in _flat(res.output)


def test_loading_the_toy_backbone_prints_no_library_noise():
    env = {k: v for k, v in os.environ.items() if k != "MMDIFF_VERBOSE"}
    res = subprocess.run([sys.executable, "-m", "mmdiff_gen.cli", "inspect", "--model", "toy"], capture_output=True,
                         text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    assert "feature blocks" in res.stdout
    assert res.stderr == "", res.stderr  # no "Loading pipeline components…" bar, no transformers warnings


def test_quiet_switches_libraries_off_for_one_command_and_restores_them():
    from diffusers.utils import logging as dlog

    from mmdiff_gen.cli._root import quiet_third_party

    level, bar, tqdm_env = dlog.get_verbosity(), dlog.is_progress_bar_enabled(), os.environ.get("TQDM_DISABLE")
    with quiet_third_party():
        assert dlog.get_verbosity() >= 40 and not dlog.is_progress_bar_enabled()
        assert os.environ["TRANSFORMERS_VERBOSITY"]
    assert (dlog.get_verbosity(), dlog.is_progress_bar_enabled(), os.environ.get("TQDM_DISABLE")) == (level, bar,
                                                                                                     tqdm_env)
    res = runner.invoke(app, ["--verbose", "inspect", "--dtype", "foo"])  # a global option, before the command
    assert res.exit_code == 2 and "'--dtype'" in res.output


@pytest.mark.parametrize("args, option", [
    (["inspect", "--dtype", "foo"], "'--dtype'"),
    (["inspect", "--sigmas", "0.5,x"], "'--sigmas'"),
    (["generate", "--tasks", "bogus"], "'--tasks'"),
    (["train", "--task", "seg,openseg", "--cache", "c", "--out", "h.safetensors"], "'--task'"),
    (["train", "--task", "seg", "--cache", "c", "--out", "h.safetensors", "--timesteps", "a"], "'--timesteps'"),
])
def test_usage_errors_name_the_option(tmp_path, args, option):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    if args[0] == "generate":
        args = [*args, "--prompts", str(prompts), "--out", str(tmp_path / "o")]
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and option in res.output, res.output
    assert "Traceback" not in res.output


def _missing_device() -> str:
    return "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"


def test_a_device_this_machine_lacks_is_one_line(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    for args in (["inspect"], ["generate", "--prompts", str(prompts), "--out", str(tmp_path / "o")]):
        res = runner.invoke(app, [*args, "--device", _missing_device()])
        assert res.exit_code == 2 and "--device" in res.output, res.output
        assert len(_lines(res.output)) == 1, res.output
    res = runner.invoke(app, ["inspect", "--device", "gpu"])
    assert res.exit_code == 2 and len(_lines(res.output)) == 1 and "not a torch device" in res.output


def test_eval_json_into_a_folder_is_refused_before_evaluating(tmp_path):
    res = runner.invoke(app, ["eval", "--head", str(tmp_path / "h.safetensors"), "--cache", str(tmp_path / "c"),
                              "--json", str(tmp_path)])
    assert res.exit_code == 2 and "--json" in res.output and "is a folder" in res.output, res.output
    assert len(_lines(res.output)) == 1


@pytest.mark.parametrize("bad", [["--batch-size", "0"], ["--epochs", "0"], ["--lr", "0"], ["--lr", "-1e-4"],
                                 ["--lr", "nan"], ["--lr", "inf"], ["--out", "."]])
def test_train_refuses_bad_settings_before_training(tmp_path, bad):
    bad = [str(tmp_path) if b == "." else b for b in bad]
    res = runner.invoke(app, ["train", "--cache", str(tmp_path / "missing-cache"), "--task", "seg",
                              "--out", str(tmp_path / "seg.safetensors"), *bad])
    assert res.exit_code == 2 and bad[0] in res.output, res.output
    assert len(_lines(res.output)) == 1


def test_hash_lines_in_a_prompts_file_are_comments(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("# VOC-like prompts\n\na red circle\n   # indented comment\n  a #1 sign on a wall  \n")
    assert read_prompts(p) == ["a red circle", "a #1 sign on a wall"]
    p.write_text("# only\n#comments\n")
    with pytest.raises(typer.Exit) as e:
        read_prompts(p)
    assert e.value.exit_code == 2
    for shipped in sorted((ROOT / "prompts").glob("*.txt")):  # no shipped prompt is lost to a comment
        assert not [ln for ln in shipped.read_text().splitlines() if ln.lstrip().startswith("#")], shipped


def test_readme_exit_codes_are_128_plus_the_linux_signal_numbers():
    readme = (ROOT / "README.md").read_text()
    assert "exit with code 130." not in readme
    section = readme[readme.index("**Exit codes.**"):]
    section = _flat(section[:section.index("\n\n")])
    for name in ("SIGINT", "SIGTERM", "SIGUSR1"):
        assert re.search(rf"\b{128 + getattr(signal, name)} for {name}\b", section), (name, section)
    assert "0 when it succeeded" in section and "1 on a runtime error" in section and "2 on a usage error" in section
