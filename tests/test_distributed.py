"""Many workers on one job: the feature cache, head training, capture and the layer probe split by rank.

Ranks of the libraries run one after another in this process; the commands run as ranks through the
RANK / WORLD_SIZE variables, and `train` as 2 CPU processes under torchrun (gloo).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from mmdiff_gen.capture import CaptureSpec
from mmdiff_gen.cli import app
from mmdiff_gen.io.readers import FilesDataset
from mmdiff_gen.jobs.probe import ProbeScores, gather_scores, part_path, probe_scores
from mmdiff_gen.toy.render import write_scenes
from mmdiff_gen.train.feature_cache import FeatureCache, build_cache, wait_for_cache

SPEC = CaptureSpec(concepts=("object", "background"))
CPU = ["--model", "tiny-random", "--device", "cpu", "--dtype", "float32"]


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


def stamps(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in Path(folder).iterdir()}


def as_rank(rank: int, world_size: int) -> dict[str, str]:
    return {"RANK": str(rank), "WORLD_SIZE": str(world_size)}


@pytest.fixture(scope="module")
def tiny():
    """The backbone the commands load as tiny-random, built once (this file's only build)."""
    from mmdiff_gen.backbones import load_backbone

    return load_backbone("tiny-random", dtype=torch.float32, device="cpu")


@pytest.fixture
def loaded_once(tiny, monkeypatch):
    """Commands in this process get the module's tiny-random instead of building their own (seconds each)."""
    import mmdiff_gen.backbones

    monkeypatch.setattr(mmdiff_gen.backbones, "load_backbone", lambda *a, **k: tiny)


@pytest.fixture
def one_thread():
    """What torchrun gives each worker (OMP_NUM_THREADS=1): CPU sums, and so cache bytes, depend on the count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    write_scenes(root / "train", 7, seed=0)  # 7: batches and shards never divide it evenly
    write_scenes(root / "val", 3, seed=100)
    return root


@pytest.fixture(scope="module")
def one(tiny, scenes):
    """The single-worker cache: 7 samples in shards of 2."""
    return build_cache(tiny, FilesDataset(scenes / "train"), SPEC, scenes / "one", shard_size=2, batch_size=2)


def test_cache_by_rank_is_the_single_worker_cache(tiny, scenes, one, tmp_path):
    ds, two = FilesDataset(scenes / "train"), tmp_path / "two"
    m = json.loads((one / "cache.json").read_text())
    assert (m["shard_size"], m["num_shards"], m["format"]) == (2, 4, 2)
    build_cache(tiny, ds, SPEC, two, shard_size=2, batch_size=2, rank=1, world_size=2)
    assert sorted(files(two)) == ["cache.json", "shard_00001.done.json", "shard_00001.safetensors",
                                  "shard_00003.done.json", "shard_00003.safetensors"]
    with pytest.raises(ValueError, match=r"unfinished \(2/4 shards\)"):
        FeatureCache(two)
    with pytest.raises(TimeoutError, match="has a worker stopped"):  # a dead worker stops the waiting, no hang
        wait_for_cache(two, stall_s=0.2, poll_s=0.05)
    before = stamps(two)
    build_cache(tiny, ds, SPEC, two, shard_size=2, batch_size=2, rank=0, world_size=2)
    after = stamps(two)
    assert {k: after[k] for k in before} == before  # rank 0 rewrote none of rank 1's files, nor cache.json
    assert files(two) == files(one)  # byte for byte
    wait_for_cache(two, stall_s=0.2)


def test_batches_are_split_evenly_and_read_by_rows(one):
    cache = FeatureCache(one)
    rows = {k: torch.cat([load_file(str(one / n))[k] for n in cache.manifest["shards"]]) for k in ("features", "seg")}
    for w in (1, 2, 3):
        steps = cache.num_batches(2, w)
        assert steps == {1: 4, 2: 2, 3: 1}[w]  # 7 = 4 + 3 → 2 + 2, then 1 + 1 (one dropped)
        for shuffle in (False, True):
            ranks = [list(cache.batches(2, shuffle=shuffle, generator=torch.Generator().manual_seed(1), rank=r,
                                        world_size=w)) for r in range(w)]
            single = list(cache.batches(2 * w, shuffle=shuffle, generator=torch.Generator().manual_seed(1)))
            assert [len(b) for b in ranks] == [steps] * w
            for k in range(steps):
                parts = [ranks[r][k] for r in range(w)]
                assert len({len(p["index"]) for p in parts}) == 1  # equal batches: DDP steps together
                union = torch.cat([p["index"] for p in parts])
                assert union.tolist() == single[k]["index"][: len(union)].tolist()
                for p in parts:  # each row is the sample its index names
                    assert torch.equal(p["features"], rows["features"][p["index"]])
                    assert torch.equal(p["seg"], rows["seg"][p["index"]])
            seen = [i for b in ranks for x in b for i in x["index"].tolist()]
            assert len(set(seen)) == len(seen)


def test_cache_of_the_previous_format(tiny, scenes, one, tmp_path):
    """cache.json listing finished shards (no done markers): read as it is, reused when finished."""
    old = tmp_path / "old"
    shutil.copytree(one, old)
    m = json.loads((old / "cache.json").read_text())
    for k in ("format", "num_shards", "bytes_per_sample", "max_shard_bytes"):
        del m[k]
    (old / "cache.json").write_text(json.dumps(m))
    for p in old.glob("*.done.json"):
        p.unlink()
    assert [b["index"].tolist() for b in FeatureCache(old).batches(3)] == [[0, 1, 2], [3, 4, 5], [6]]
    build_cache(tiny, FilesDataset(scenes / "train"), SPEC, old, shard_size=2)  # finished: nothing to do
    assert not list(old.glob("*.done.json"))
    m["shards"] = m["shards"][:3]
    (old / "cache.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="unfinished"):
        FeatureCache(old)
    with pytest.raises(ValueError, match="older mmdiff-gen"):
        build_cache(tiny, FilesDataset(scenes / "train"), SPEC, old, shard_size=2)


def test_capture_by_rank(loaded_once, tmp_path):
    (tmp_path / "p.txt").write_text("a red cube\na blue ball\n")
    args = ["capture", "--prompts", str(tmp_path / "p.txt"), "--size", "64", "--steps", "2", "--batch-size", "1",
            "--sigmas", "0.26", "--concepts", "object,background", "--max-sequence-length", "16", *CPU]
    run = CliRunner().invoke
    res = run(app, [*args, "--out", str(tmp_path / "one")])
    assert res.exit_code == 0, res.output
    for r in (1, 0):  # batch b goes to worker b mod 2
        res = run(app, [*args, "--out", str(tmp_path / "two")], env=as_rank(r, 2))
        assert res.exit_code == 0 and f"worker {r} of 2" in res.output and "wrote 1 samples" in res.output
        if r == 1:
            assert {p.stem for p in (tmp_path / "two").iterdir()} == {"000000001"}
    assert files(tmp_path / "two") == files(tmp_path / "one")


def test_probe_by_rank(tiny, loaded_once, scenes, tmp_path):
    ds = FilesDataset(scenes / "train")
    kw = {"sigmas": (0.26,), "n": 2, "batch_size": 1}
    single = probe_scores(tiny, ds, ds.classes, **kw)
    part = probe_scores(tiny, ds, ds.classes, rank=1, world_size=2, **kw)
    assert part.samples == 1
    out = tmp_path / "p.json"
    ProbeScores(**{**vars(part), "settings": "another run"}).save(part_path(out, 1, 2))
    with pytest.raises(TimeoutError):  # a stale part of other settings is never merged
        gather_scores(part, out, 0, 2, stall_s=0.1, poll_s=0.02)
    # The command: rank 1 leaves its part, rank 0 merges it and writes the table; without --json, refused.
    args = ["probe-layers", "--data", str(scenes / "train"), "--n", "2", "--batch-size", "1", "--sigmas", "0.26", *CPU]
    run = CliRunner().invoke
    res = run(app, args, env=as_rank(0, 2))
    assert res.exit_code == 2 and "need --json" in res.output
    res = run(app, [*args, "--json", str(out)], env=as_rank(1, 2))
    assert res.exit_code == 0 and "worker 0 merges" in res.output and not out.exists()
    res = run(app, [*args, "--json", str(out)], env=as_rank(0, 2))
    assert res.exit_code == 0 and "expert layer" in res.output, res.output
    merged = json.loads(out.read_text())
    assert not part_path(out, 1, 2).exists() and merged["samples"] == 2
    np.testing.assert_array_equal(np.array(merged["miou"]), single.result()["miou"])  # the counts add up exactly


def test_torchrun_train_on_two_cpu_processes(loaded_once, one_thread, scenes, tmp_path):
    """`train --data` as 2 processes: the cache is extracted across them (here resuming a rank-1 extract run), both
    train the same number of steps on 7 samples (no hang), and reach the metrics of one process."""
    run = CliRunner().invoke
    extract = ["extract", "--tasks", "depth", "--batch-size", "4",
               "--max-shard-bytes", f"{2 * 100_000}", *CPU]
    for data, folder in (("train", "c1"), ("val", "v")):
        res = run(app, [*extract, "--data", str(scenes / data), "--out", str(tmp_path / folder)])
        assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "c1" / "cache.json").read_text())  # shards sized by bytes: as many samples as fit
    assert m["shard_size"] == 200_000 // m["bytes_per_sample"] and m["num_shards"] >= 3  # int8: ≈ 66 kB a sample
    assert all((tmp_path / "c1" / n).stat().st_size < 200_000 + 4096 for n in m["shards"])
    res = run(app, [*extract, "--data", str(scenes / "train"), "--out", str(tmp_path / "c2")], env=as_rank(1, 2))
    assert res.exit_code == 0 and "worker 1 of 2" in res.output, res.output
    train = ["--task", "depth", "--side", "none", "--epochs", "2", "--lr", "3e-3", "--decoder-channels", "16"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_"))}
    env["OMP_NUM_THREADS"] = "1"  # as in this process (one_thread); more oversubscribes 2 cores: minutes, not seconds
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "mmdiff_gen.cli", "train", "--data", str(scenes / "train"), "--cache", str(tmp_path / "c2"),
           "--eval-cache", str(tmp_path / "v"), "--batch-size", "2",
           "--out", str(tmp_path / "two.safetensors"), *train, *CPU]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert files(tmp_path / "c2") == files(tmp_path / "c1")  # rank 0 wrote shards 0, 2, …; rank 1 had the others
    assert proc.stderr.count("(2 steps,") == 2  # 7 samples: 2 + 2, then 1 + 1 per step, every epoch
    # One process, the same global batch (4) and evaluation set.
    res = run(app, ["train", "--cache", str(tmp_path / "c1"), "--eval-cache", str(tmp_path / "v"), "--batch-size", "4",
                    "--out", str(tmp_path / "one.safetensors"), *train])
    assert res.exit_code == 0, res.output
    from mmdiff_gen.heads.checkpoint import read_meta

    m1, m2 = (read_meta(tmp_path / f"{n}.safetensors").metrics for n in ("one", "two"))
    assert m1["abs_rel"] == pytest.approx(m2["abs_rel"], abs=0.01) and m1["rmse"] == pytest.approx(m2["rmse"], rel=0.01)
