"""Beyond one shared disk: the Ray engine (a local Ray with 2 CPU workers) on the toy backbone, writing to a real
S3 API server on loopback (moto's), read back by verify, export, preview, HF datasets and webdataset."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mmdiff_gen.cli import app
from mmdiff_gen.io.dataset import GeneratedDataset
from mmdiff_gen.io.store import LocalStore, open_store
from mmdiff_gen.jobs.dataset_job import GenerateJob
from mmdiff_gen.jobs.generator import GenerateConfig, generate_dataset

BUCKET = "mmdiff-ci"
PROMPTS = ["a large red circle on the left", "a small blue star on the right", "a large yellow square in the center",
           "a small white cross in the center"]
KEYS = [f"{i:09d}" for i in range(8)]


@pytest.fixture(scope="module")
def s3():
    """A bucket on moto's S3 server on a loopback port, reached as s3fs and boto find any endpoint: the environment."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as m:
        for k, v in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "ci", "AWS_SECRET_ACCESS_KEY": "ci",
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull,
                     "AWS_SHARED_CREDENTIALS_FILE": os.devnull}.items():
            m.setenv(k, v)
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield f"s3://{BUCKET}"
    server.stop()


@pytest.fixture(scope="module")
def cluster(s3):
    """A local Ray cluster of 2 CPUs; started after the S3 environment is set, so its workers inherit it."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def config(out, engine="ray", **kw) -> GenerateConfig:
    job = GenerateJob(out=out, tasks=("seg", "saliency", "depth"), images_per_prompt=2, shard_size=2, batch_size=2)
    return GenerateConfig(prompts=PROMPTS, job=job, device="cpu", engine=engine,
                          workers=2 if engine == "ray" else None, **kw)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """One local process at one thread, as each 1-CPU Ray worker computes."""
    out = tmp_path_factory.mktemp("local") / "ds"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generate_dataset(config(out, engine="local"), progress=False)
    finally:
        torch.set_num_threads(threads)
    return out


def _started_by_us(pid: int) -> bool:
    """Whether a process descends from this test process (our local Ray's raylet spawned it): only ours is killed."""
    for _ in range(4):
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])  # field 4: the parent
        except (OSError, ValueError, IndexError):
            return False
        if pid == os.getpid():
            return True
    return False


def objects(store, pattern="*") -> dict[str, bytes]:
    return {n: store.read_bytes(n) for n in store.names(pattern)}


def test_ray_job_writes_a_bucket_equal_to_a_local_run_that_every_reader_reads(s3, cluster, local_run, tmp_path):
    url = f"{s3}/ds"
    rep = generate_dataset(config(url), progress=False)
    assert (rep.samples_written, rep.shards_written, rep.workers_lost) == (8, 4, 0)
    bucket, local = open_store(url), LocalStore(local_run)
    assert objects(bucket, "*.tar") == objects(local, "*.tar")  # pixel-exact: same threads per worker
    assert objects(bucket, "sizes.json") == objects(local, "sizes.json")
    index = json.loads(bucket.read_bytes("shardindex.json"))
    assert [s["url"] for s in index["shardlist"]] == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
    assert bucket.names(".*") == []  # no claim or temporary left in the bucket

    # Resume through the CLI: everything finished, nothing scheduled; the same summary as a local run.
    runner = CliRunner()
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS))
    res = runner.invoke(app, ["generate", "--prompts", str(tmp_path / "prompts.txt"), "--out", url, "--engine", "ray",
                              "--device", "cpu", "-n", "2", "--shard-size", "2", "--batch-size", "2"])
    assert res.exit_code == 0 and f"{url}: 0 samples written in 0 shard(s), 4 already finished" in res.output, res.output
    res = runner.invoke(app, ["verify", url])
    assert res.exit_code == 0 and "all 4 shard(s) whole" in res.output, res.output
    res = runner.invoke(app, ["export", "--in", url, "--out", str(tmp_path / "coco")])
    assert res.exit_code == 0, res.output
    coco = json.loads((tmp_path / "coco" / "annotations.json").read_text())
    assert len(coco["images"]) == 8
    res = runner.invoke(app, ["preview", url, "--out", str(tmp_path / "sheet.png"), "-n", "8"])
    assert res.exit_code == 0 and "8 samples" in res.output, res.output
    assert [s.key for s in GeneratedDataset(url)] == KEYS

    # HF datasets and webdataset read the bucket through fsspec (s3fs).
    import datasets
    import fsspec
    import webdataset as wds
    from webdataset.gopen import gopen_schemes

    hf = datasets.load_dataset("webdataset", data_files={"train": f"{url}/*.tar"}, split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert sorted(hf["__key__"]) == KEYS and hf[0]["txt"] in PROMPTS
    gopen_schemes["s3"] = lambda u, mode="rb", bufsize=8192, **_: fsspec.open(u, mode).open()
    shards = [f"{url}/{s['url']}" for s in index["shardlist"]]
    got = [(x["__key__"], x["txt"].decode()) for x in wds.WebDataset(shards, shardshuffle=False)]
    assert [k for k, _ in got] == KEYS and all(p in PROMPTS for _, p in got)


def test_a_killed_worker_costs_only_its_shard(s3, cluster, local_run):
    """SIGKILL one worker while it writes a shard: the shard goes to a replacement, nothing half-visible, every key
    once, the bytes those of one local process."""
    url = f"{s3}/killed"
    killed = []

    def kill_a_writer():
        deadline = time.monotonic() + 120
        while not killed and time.monotonic() < deadline:
            for proc in Path("/proc").glob("[0-9]*"):
                try:
                    title = (proc / "cmdline").read_bytes()
                except OSError:
                    continue
                if title.startswith(b"ray::_Worker.write") and _started_by_us(int(proc.name)):
                    time.sleep(0.3)  # into its generation pass
                    os.kill(int(proc.name), signal.SIGKILL)
                    killed.append(int(proc.name))
                    return
            time.sleep(0.05)

    said = []
    killer = threading.Thread(target=kill_a_writer, daemon=True)
    killer.start()
    rep = generate_dataset(config(url), progress=False, say=said.append)
    killer.join()
    assert killed and rep.workers_lost == 1, said
    assert any("died while writing shard" in line for line in said), said
    assert [s.key for s in GeneratedDataset(url)] == KEYS
    assert objects(open_store(url), "*.tar") == objects(LocalStore(local_run), "*.tar")
    assert open_store(url).names(".*") == []
    res = CliRunner().invoke(app, ["verify", url])
    assert res.exit_code == 0, res.output


def test_plain_processes_on_a_bucket_claim_shards_and_a_rerun_repairs_damage(s3, local_run):
    """Without Ray: a plain process writes the bucket (claims are conditional creates); a deleted shard object and
    a same-size altered one fail `verify` in one line each, and re-running the same job redoes exactly those."""
    from mmdiff_gen.io.shards import ShardClaim

    url = f"{s3}/plain"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rep = generate_dataset(config(url, engine="local"), progress=False)
        assert rep.shards_written == 4
        store = open_store(url)
        a, b = ShardClaim(store, 1), ShardClaim(store, 1)
        assert a.acquire() and not b.acquire() and a.held() and not b.held()
        a.release()
        assert store.names(".*") == []

        store.delete("00001.tar")
        data = bytearray(store.read_bytes("00002.tar"))
        data[1000] ^= 0xFF
        store.write_bytes("00002.tar", bytes(data))
        res = CliRunner().invoke(app, ["verify", url])
        assert res.exit_code == 1
        assert "00001: 00001.tar is missing" in res.output and "00002: 00002.tar: sha256 differs" in res.output

        rep = generate_dataset(config(url, engine="local"), progress=False)
        assert (rep.shards_damaged, rep.shards_written, rep.shards_skipped) == (2, 2, 2)
    finally:
        torch.set_num_threads(threads)
    assert objects(store, "*.tar") == objects(LocalStore(local_run), "*.tar")
    assert CliRunner().invoke(app, ["verify", url]).exit_code == 0
