"""Resumable training state without pickle: exact round trips, and no loop runs code planted as its state file."""

import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from mmdiff_gen.io.state import load_state, save_state
from mmdiff_gen.toy.recipe import ToyRecipe

RECIPE = ToyRecipe(vae_batch=2)


class Planted:
    """Unpickling this touches `marker`: the file a loader must never execute."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def plant(path: Path, marker: Path) -> None:
    torch.save(Planted(marker), path)


def test_planted_file_runs_code_when_unpickled(tmp_path):
    # The attack the other tests guard against is real: an unpickling loader runs it.
    plant(tmp_path / "x.pt", tmp_path / "MARKER")
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert (tmp_path / "MARKER").exists()


def assert_same(a, b, where="state"):
    """Same structure, same Python types (3 is not "3", tuples stay tuples) and the same tensor bits."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and (a.dtype, a.shape) == (b.dtype, b.shape), where
        bits = lambda t: t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # noqa: E731
        assert torch.equal(bits(a), bits(b)), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and [(type(k), k) for k in a] == [(type(k), k) for k in b], where
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}/{i}")
    else:
        assert type(a) is type(b), where
        assert repr(a) == repr(b), where  # bit-exact for floats, nan and -0.0 included


def _model_and_opt(seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    opt = torch.optim.AdamW([{"params": model[0].parameters(), "lr": 1e-2},
                             {"params": list(model[1].parameters()) + list(model[2].parameters()), "lr": 5e-3}],
                            betas=(0.8, 0.99), amsgrad=True)
    return model, opt


def _step(model, opt, seed: int):
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(seed))
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()


def test_round_trip_of_model_and_adamw_state_resumes_exactly(tmp_path):
    model, opt = _model_and_opt(0)
    for s in range(2):
        _step(model, opt, s)
    w = model[0].weight
    state = {
        "model": model.state_dict(), "opt": opt.state_dict(), "step": 2,
        "extras": {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "none": None, "zero": -0.0,
                   7: ("a", 1, 1.0, True), "nested": [[], {}, ()], "3": torch.ones(2), 3: torch.zeros(2)},
        # Tied weights and views share storage (safetensors refuses that on its own).
        "tied": [w, w, w[1:3], w.t()],
        "dtypes": [torch.arange(3, dtype=torch.bfloat16), torch.tensor([True, False]), torch.empty(0, 3),
                   torch.tensor(5, dtype=torch.int64)],
    }
    path = tmp_path / "s.safetensors"
    save_state(path, state)
    assert os.listdir(tmp_path) == ["s.safetensors"]  # one file, no temporary left behind
    with safe_open(str(path), "pt") as f:
        assert "structure" in f.metadata() and {"model/0.weight", "opt/state/0/exp_avg"} <= set(f.keys())
    loaded = load_state(path)
    assert_same(state, loaded)
    assert isinstance(next(iter(loaded["opt"]["state"])), int)
    assert loaded["opt"]["param_groups"][0]["betas"] == (0.8, 0.99)

    # Resuming from the file continues bit for bit like the run that never stopped.
    model2, opt2 = _model_and_opt(1)
    model2.load_state_dict(loaded["model"])
    opt2.load_state_dict(loaded["opt"])
    _step(model, opt, 2)
    _step(model2, opt2, 2)
    assert_same(model.state_dict(), model2.state_dict())
    assert_same(opt.state_dict(), opt2.state_dict())


def test_save_refuses_what_it_cannot_store_and_leaves_nothing(tmp_path):
    for bad in ({"x": object()}, {1.5: 1}, {"x": np.zeros(2)}):
        with pytest.raises(TypeError):
            save_state(tmp_path / "s.safetensors", bad)
    assert os.listdir(tmp_path) == []


def _write_variants(tmp_path: Path, marker: Path) -> dict[str, Path]:
    good = tmp_path / "good.safetensors"
    save_state(good, {"w": torch.ones(64), "step": 1})
    raw = good.read_bytes()
    files = {"pickle": tmp_path / "p.safetensors", "truncated": tmp_path / "t.safetensors",
             "plain": tmp_path / "n.safetensors", "structure": tmp_path / "s.safetensors",
             "empty": tmp_path / "e.safetensors", "pickle-dump": tmp_path / "d.safetensors"}
    plant(files["pickle"], marker)
    with open(files["pickle-dump"], "wb") as f:
        pickle.dump(Planted(marker), f)
    files["truncated"].write_bytes(raw[: len(raw) - 100])
    save_file({"w": torch.ones(2)}, str(files["plain"]))  # a safetensors file, but no state in it
    save_file({"w": torch.ones(2)}, str(files["structure"]),
              metadata={"format": "mmdiff-gen/state", "version": "1", "structure": '{"tensor": "missing"}'})
    files["empty"].write_bytes(b"")
    return files


def test_load_refuses_anything_but_a_state_file_in_one_line(tmp_path):
    marker = tmp_path / "MARKER"
    for kind, path in _write_variants(tmp_path, marker).items():
        with pytest.raises(ValueError, match="delete it to start over") as e:
            load_state(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value), kind
    assert not marker.exists()
    with pytest.raises(FileNotFoundError):
        load_state(tmp_path / "absent.safetensors")


# Every loop that looks for state: a pickle planted under the old or the new name never runs.


def test_heads_trainer_never_unpickles_its_state(tiny, tmp_path):
    from typer.testing import CliRunner

    from mmdiff_gen.capture import CaptureSpec
    from mmdiff_gen.cli import app
    from mmdiff_gen.io.readers import FilesDataset
    from mmdiff_gen.toy.render import write_scenes
    from mmdiff_gen.train.feature_cache import build_cache

    write_scenes(tmp_path / "scenes", 2, seed=0)
    build_cache(tiny, FilesDataset(tmp_path / "scenes"), CaptureSpec(concepts=("object", "background")),
                tmp_path / "c", shard_size=2, batch_size=2)
    marker, out = tmp_path / "MARKER", tmp_path / "tevil.safetensors"
    old, new = tmp_path / ".tevil.state.pt", tmp_path / ".tevil.state.safetensors"
    plant(old, marker)
    plant(new, marker)
    args = ["train", "--cache", str(tmp_path / "c"), "--task", "seg", "--out", str(out), "--epochs", "1",
            "--batch-size", "2", "--decoder-channels", "16"]
    res = CliRunner().invoke(app, args)
    assert not marker.exists()
    assert res.exit_code == 1, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(new) in errors[0] and errors[0].endswith("delete it to start over"), res.output
    assert not out.exists()
    # The old pickle name is never read: with only it left, training runs and writes the new state.
    new.unlink()
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert not marker.exists() and load_state(new)["epoch"] == 1 and out.is_file()


@pytest.fixture(scope="module")
def toy_pipe():
    return RECIPE.build_pipeline()


def test_toy_phase_never_unpickles_its_checkpoint(toy_pipe, tmp_path):
    from mmdiff_gen.toy.data import render_arrays
    from mmdiff_gen.toy.train_vae import train_vae

    data, marker = render_arrays(0, 4), tmp_path / "MARKER"
    plant(tmp_path / "vae.ckpt", marker)
    plant(tmp_path / "vae.state.safetensors", marker)
    with pytest.raises(ValueError, match=r"vae\.state\.safetensors .*delete it to start over"):
        train_vae(toy_pipe.vae, data, RECIPE, tmp_path, steps=1)
    assert not marker.exists()
    (tmp_path / "vae.state.safetensors").unlink()
    train_vae(toy_pipe.vae, data, RECIPE, tmp_path, steps=1)
    assert not marker.exists() and load_state(tmp_path / "vae.state.safetensors")["step"] == 1


def test_latents_cache_never_unpickles(toy_pipe, tmp_path):
    from mmdiff_gen.toy.data import render_arrays
    from mmdiff_gen.toy.train_dit import cached_latents
    from mmdiff_gen.toy.train_vae import encode_mean

    vae, data, marker = toy_pipe.vae, render_arrays(0, 2), tmp_path / "MARKER"
    plant(tmp_path / "latents.pt", marker)
    plant(tmp_path / "latents.safetensors", marker)
    lat = cached_latents(vae, data, tmp_path)
    assert not marker.exists()
    # A cache is derived data: a file that is not a valid state is a cache miss, recomputed and overwritten.
    assert torch.equal(lat, encode_mean(vae, data.images).half())
    saved = load_state(tmp_path / "latents.safetensors")
    assert torch.equal(saved["latents"], lat) and saved["key"]["n"] == 2
    assert torch.equal(cached_latents(vae, data, tmp_path), lat)


def test_depth_npy_is_read_without_pickle(tmp_path):
    from mmdiff_gen.io.datasets._read import read_depth

    marker = tmp_path / "MARKER"
    np.save(tmp_path / "d.npy", np.array([Planted(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        read_depth(tmp_path / "d.npy")
    assert not marker.exists()
