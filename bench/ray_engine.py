"""The Ray engine and object storage on the toy backbone: what Ray and a bucket cost, per job and per shard.

One command, one run (a local Ray of 2 CPUs and a moto S3 server on loopback are started here):

    python bench/ray_engine.py [--prompts 6] [--images 4] [--shard-size 3] [--rounds 3] [--json out.json]
    python bench/ray_engine.py --smoke     # 2 prompts × 2 images, shards of 2, 4 steps, 1 round (test_benches)

(a) The same job (toy, --device cpu) written by one local process (engine local), by Ray with one CPU worker
    holding both cores, both into a local folder, and by Ray into a bucket of the loopback S3 server, in
    interleaved rounds: wall clock, Ray / local, and Ray's fixed cost (cluster start; the worker's start and load,
    dataset.json and the resume scan until its first shard starts; the end: workers stopped, indexes written)
    against its cost per shard.
(b) Per shard, what the driver costs outside the worker: (Ray wall − the worker's shard time) / shards, and the
    gap on the worker between one shard's end and the next one's start (the driver's loop: the result fetched,
    counted, the next shard handed out). The bucket: the S3 requests of a worker's shard, one shard's upload
    (bytes, seconds; also a 1024² shard's size), the S3 requests and seconds per shard of the driver's resume scan
    (new dataset, finished dataset) and of its index writing, one request through `open_store` against one through
    a new filesystem.
(c) ARITHMETIC, not measured: the driver's and the upload's share of a FLUX.1-dev 1024² job on 8, 64 and 512
    GPUs, from (a, b) and the assumptions printed with it (jobs/plan.py's shard: 64 samples ≈ 5 GPU-minutes;
    a 1024² sample's bytes from the toy's members scaled by pixel count, and from a synthetic 1024² sample;
    the upload bandwidth per node; an in-region S3 request's latency).

The worker's shard times come from a subclass of the engine's actor that logs when it loads and writes (the
engine itself is unchanged). On 2 cores the driver, the S3 server and the worker share the CPU; other processes
on the same cores only ever add time, hence minima and medians over rounds, and the load average printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from collections import Counter, defaultdict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from mmdiff_gen.jobs import dataset_job, ray_engine
from mmdiff_gen.jobs.dataset_job import GenerateJob, shard_finished, write_dataset_indexes
from mmdiff_gen.jobs.generator import DatasetGenerator, GenerateConfig, generate_dataset

ROOT = Path(__file__).resolve().parent.parent
TASKS = ("seg", "saliency", "depth")
BUCKET = "mmdiff-bench"
EVENTS = "MMDIFF_BENCH_EVENTS"  # the file the timed workers append to (inherited from the driver's environment)
BaseWorker = ray_engine._Worker


def _log(kind: str, t0: float, t1: float, **kw) -> None:
    with open(os.environ[EVENTS], "a") as f:
        f.write(json.dumps({"kind": kind, "t0": t0, "t1": t1, "pid": os.getpid(), **kw}) + "\n")


class TimedWorker(BaseWorker):
    """The engine's actor, logging its load and each shard it writes (wall clock of this machine)."""

    def __init__(self, config, threads):
        t0 = time.time()
        BaseWorker.__init__(self, config, threads)
        _log("load", t0, time.time())

    def write(self, shard, token):
        t0 = time.time()
        rep = BaseWorker.write(self, shard, token)
        _log("write", t0, time.time(), shard=shard)
        return rep


@contextmanager
def environ(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def s3_server():
    """A bucket on moto's S3 server on a loopback port; the environment points boto / s3fs at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    log = logging.getLogger("werkzeug")  # moto's server logs every request
    level = log.level
    log.setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        with environ(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                     AWS_DEFAULT_REGION="us-east-1", AWS_CONFIG_FILE=os.devnull,
                     AWS_SHARED_CREDENTIALS_FILE=os.devnull):
            boto3.client("s3").create_bucket(Bucket=BUCKET)
            yield f"s3://{BUCKET}"
    finally:
        server.stop()
        log.setLevel(level)


def make_config(out, prompts, images, shard_size, steps, engine) -> GenerateConfig:
    job = GenerateJob(out=out, tasks=TASKS, images_per_prompt=images, shard_size=shard_size, batch_size=4,
                      num_inference_steps=steps)
    return GenerateConfig(prompts=tuple(prompts), job=job, model="toy", device="cpu", engine=engine,
                          workers=1 if engine == "ray" else None)


def steady(times: list[float]) -> dict:
    """The first shard of a fresh process (its first forward warms up) apart from the later ones."""
    return {"first_shard_s": times[0], "later_shards_s": times[1:] or times}


def combine(runs: list[dict]) -> dict:
    """Interleaved repeats of one run, as the other benches do (on a shared CPU, noise only ever adds time): the
    minimum of each fixed cost over the rounds; a later shard's and the driver's gap as the median (and minimum)
    of all of them."""
    out = {k: min(r[k] for r in runs) for k, v in runs[0].items() if isinstance(v, (int, float))}
    if "load_s" in out:  # this process loads the toy again from what the first round left cached: not a fresh load
        out["load_s"] = runs[0]["load_s"]
        out["wall_s"] = out["load_s"] + min(r["run_s"] for r in runs)
    later = sorted(t for r in runs for t in r["later_shards_s"])
    out |= {"later_shard_s": statistics.median(later), "later_shard_min_s": later[0], "rounds": runs}
    if "gap_s" in runs[0]:
        gaps = sorted(g for r in runs for g in r["gap_s"])
        out |= {"gap_median_s": statistics.median(gaps) if gaps else 0.0, "gap_min_s": gaps[0] if gaps else 0.0}
    return out


def run_local(config: GenerateConfig) -> dict:
    """The local engine in this process; each shard's time from around ShardProducer.write (what run_shards calls)."""
    write, times = dataset_job.ShardProducer.write, []

    def timed_write(producer, *a, **kw):
        t = time.perf_counter()
        try:
            return write(producer, *a, **kw)
        finally:
            times.append(time.perf_counter() - t)

    dataset_job.ShardProducer.write = timed_write
    try:
        t0 = time.perf_counter()
        gen = DatasetGenerator(config)
        t1 = time.perf_counter()
        rep = gen.run(0, 1, progress=False)
        t2 = time.perf_counter()
    finally:
        dataset_job.ShardProducer.write = write
    assert rep.shards_written == len(gen.producer.ranges), rep
    return {"wall_s": t2 - t0, "load_s": t1 - t0, "run_s": t2 - t1, "shards": rep.shards_written,
            "samples": rep.samples_written, "per_shard_s": (t2 - t1) / rep.shards_written, "stages": rep.seconds,
            **steady(times)}


def run_ray(config: GenerateConfig, events: Path) -> dict:
    """One Ray job with the timed worker; the driver's and the worker's times."""
    events.write_text("")
    ray_engine._Worker = TimedWorker
    try:
        t0 = time.time()
        rep = generate_dataset(config, progress=False)
        t1 = time.time()
    finally:
        ray_engine._Worker = BaseWorker
    assert rep.workers_lost == 0 and rep.shards_written > 0, rep
    ev = [json.loads(line) for line in events.read_text().splitlines()]
    load = next(e for e in ev if e["kind"] == "load")
    writes = sorted((e for e in ev if e["kind"] == "write"), key=lambda e: e["t0"])
    worker_s = sum(e["t1"] - e["t0"] for e in writes)
    gaps = [b["t0"] - a["t1"] for a, b in zip(writes, writes[1:])]
    n = len(writes)
    return {"wall_s": t1 - t0, "shards": n, "samples": rep.samples_written,
            "worker_start_s": load["t0"] - t0,  # process start and imports, until the actor's __init__
            "worker_load_s": load["t1"] - load["t0"],  # the toy, its heads, the generator
            "until_first_shard_s": writes[0]["t0"] - t0,  # + dataset.json and the driver's resume scan
            "tail_s": t1 - writes[-1]["t1"],  # the last result, workers stopped, indexes written
            "worker_shard_s": worker_s / n, **steady([e["t1"] - e["t0"] for e in writes]), "gap_s": gaps,
            "outside_worker_per_shard_s": (t1 - t0 - worker_s) / n}


class RequestCount:
    """S3 requests made by this process (s3fs's one call site), by API name, and the stores it opened (each
    `FsspecStore` is a new s3fs filesystem: a new botocore client before its first request)."""

    def __init__(self):
        import s3fs.core

        from mmdiff_gen.io.store import FsspecStore

        self.cls, self.orig, self.counts = s3fs.core.S3FileSystem, s3fs.core.S3FileSystem._call_s3, Counter()
        self.store_cls, self.store_init, self.stores = FsspecStore, FsspecStore.__init__, 0

    def __enter__(self):
        orig, counts, init = self.orig, self.counts, self.store_init

        async def counted(fs, method, *a, **kw):
            counts[method if isinstance(method, str) else getattr(method, "__name__", str(method))] += 1
            return await orig(fs, method, *a, **kw)

        def opened(store, *a, **kw):
            self.stores += 1
            init(store, *a, **kw)

        self.cls._call_s3, self.store_cls.__init__ = counted, opened
        return self

    def __exit__(self, *_):
        self.cls._call_s3, self.store_cls.__init__ = self.orig, self.store_init

    def per(self, n: int, fixed: tuple[str, ...] = ()) -> dict:
        """Per unit of n (shards): requests (less the `fixed` APIs, made once), stores opened, and the counts."""
        return {"requests_per_shard": sum(v for k, v in self.counts.items() if k not in fixed) / n,
                "stores_per_shard": self.stores / n, "requests": dict(self.counts)}


def timed(fn, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bucket_costs(url: str, local_ds: Path, job: GenerateJob, work: Path, big_bytes: int) -> dict:
    """(b) on the bucket, in this process: one shard's upload (the toy's, and `big_bytes` of a 1024² shard), the
    driver's resume scan and index writing."""
    from mmdiff_gen.io.shards import read_json
    from mmdiff_gen.io.store import open_store

    store = open_store(url)
    info = read_json(store, "dataset.json")
    n = info["num_shards"]
    tar = local_ds / "00000.tar"
    up = open_store(f"{url}-upload")

    def upload(src: Path, name: str) -> float:
        tmp = work / "upload.tmp"
        shutil.copyfile(src, tmp)
        t0 = time.perf_counter()
        up.publish(tmp, name)
        return time.perf_counter() - t0

    upload(tar, "00000.tar")  # the connection opened
    upload_s = min(upload(tar, "00000.tar") for _ in range(5))
    big = work / "big.bin"  # a 1024² shard's size of random bytes (bytes are bytes to an upload)
    with open(big, "wb") as f:
        for i in range(0, big_bytes, 1 << 24):
            f.write(os.urandom(min(1 << 24, big_bytes - i)))
    big_s = min(upload(big, "big.tar") for _ in range(2))
    big.unlink()
    out = {"upload": {"bytes": tar.stat().st_size, "s": upload_s, "mb_per_s": tar.stat().st_size / upload_s / 1e6},
           "upload_1024": {"bytes": big_bytes, "s": big_s, "mb_per_s": big_bytes / big_s / 1e6}}

    def scan(location):
        j = GenerateJob(out=location, tasks=job.tasks, shard_size=job.shard_size)
        best = float("inf")
        for _ in range(3):
            dataset_job._MARKERS.clear()  # a driver's first look: nothing cached
            with RequestCount() as rc:
                t0 = time.perf_counter()
                done = sum(shard_finished(j, info, s, None) for s in range(n))
                best = min(best, time.perf_counter() - t0)
        return {"s_per_shard": best / n, **rc.per(n), "finished": done}

    out["scan_fresh"] = scan(f"{url}-empty")  # a new dataset: no marker anywhere
    out["scan_finished"] = scan(url)  # a rerun of a finished one
    dt = float("inf")
    for _ in range(3):
        dataset_job._MARKERS.clear()
        with RequestCount() as rc:
            t0 = time.perf_counter()
            write_dataset_indexes(store, info)
            dt = min(dt, time.perf_counter() - t0)
    out["indexes"] = {"s_per_shard": dt / n, **rc.per(n, fixed=("put_object",))}  # 2 PUTs a job: the indexes
    from mmdiff_gen.io.store import FsspecStore

    out["head_new_filesystem_s"] = timed(lambda: FsspecStore(url).stat("dataset.json"), 10)
    out["head_open_store_s"] = timed(lambda: open_store(url).stat("dataset.json"), 10)
    return out


def worker_on_bucket(config: GenerateConfig) -> dict:
    """What a worker's shard asks of the bucket: one shard written in this process (loaded once, not timed)."""
    gen = DatasetGenerator(config)
    gen.prepare(0)
    with RequestCount() as rc:
        t0 = time.perf_counter()
        rep = gen.write_shard(0, "bench")
        dt = time.perf_counter() - t0
    assert rep.shards_written == 1, rep
    batches = -(-len(gen.producer.ranges[0]) // gen.job.batch_size)
    return {"s": dt, "batches": batches, **rc.per(1)}


def toy_sample_bytes(ds: Path) -> dict:
    """Mean bytes per member of one sample, from a shard of the local run."""
    per: dict[str, list[int]] = defaultdict(list)
    with tarfile.open(ds / "00000.tar") as t:
        for m in t.getmembers():
            per[m.name.split(".", 1)[1]].append(m.size)
    return {k: sum(v) / len(v) for k, v in per.items()}


def synthetic_1024_bytes() -> dict:
    """Bytes per member of a synthetic 1024² sample, encoded as `generate` encodes one: a photo-like JPEG (a wave
    and noise), a block seg map of 21 classes, a smooth saliency map and a noisy depth map."""
    from mmdiff_gen.io.members import encode_sample

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:1024, 0:1024]
    wave = 128 + 60 * np.sin(xx / 37.0)[..., None] + rng.normal(0, 12, (1024, 1024, 3))
    image = np.clip(wave, 0, 255).astype(np.uint8)
    labels = {"seg": ((xx // 128 + yy // 128) % 21).astype(np.uint8),
              "saliency": np.clip(255 * np.exp(-((xx - 512) ** 2 + (yy - 512) ** 2) / 1e5), 0, 255).astype(np.uint8),
              "depth": (2 + yy / 300 + rng.normal(0, 0.05, (1024, 1024))).astype(np.float32)}
    members = encode_sample(image, "a prompt of about this length", {"key": 0}, labels, image_format="jpg",
                            classes=[str(i) for i in range(21)])
    return {k: len(v) for k, v in members.items()}


def arithmetic(res: dict, a: argparse.Namespace) -> dict:
    """(c): FLUX.1-dev at 1024² on 8, 64, 512 GPUs, from the measured figures and the stated assumptions."""
    toy, syn = res["sample_bytes"]["toy"], res["sample_bytes"]["synthetic_1024"]
    scale = 1024 * 1024 / res["pixels"]
    toy_scaled = sum(toy.values()) * scale  # every member scaled by pixel count (txt and json too: an over-estimate)
    sample = max(toy_scaled, sum(syn.values()))
    shard_bytes = a.samples_per_shard * sample
    shards = -(-a.job_samples // a.samples_per_shard)
    gap = res["ray_local"]["gap_median_s"]
    b = res["bucket"]

    def serial(k):  # the driver's work per shard here (loopback requests, clients built) + its requests' latency
        return shards * (b[k]["s_per_shard"] + b[k]["requests_per_shard"] * a.request_ms / 1e3)

    scan_s, rescan_s, index_s = serial("scan_fresh"), serial("scan_finished"), serial("indexes")
    # A worker's bucket work per shard besides the upload: as measured here (loopback), plus every request's
    # latency; the claim is read and rewritten before each batch (io.shards.ShardClaim.held): 2 requests a batch.
    w = b["worker"]
    batches = -(-a.samples_per_shard // a.batch_size)
    worker_requests = w["requests_per_shard"] + 2 * (batches - w["batches"])
    extra = max(0.0, res["ray_s3"]["later_shard_min_s"] - res["ray_local"]["later_shard_min_s"])
    worker_s = extra + worker_requests * a.request_ms / 1e3
    rows = {}
    for gpus in (8, 64, 512):
        job_s = shards * a.gpu_s_per_shard / gpus
        up_alone = shard_bytes / (a.node_gb_per_s * 1e9)  # one GPU of the node uploading
        up_shared = up_alone * min(gpus, a.gpus_per_node)  # every GPU of the node uploading at once
        rows[gpus] = {
            "job_hours": job_s / 3600,
            "driver_gap_share": gap / (a.gpu_s_per_shard + gap),  # each GPU idles one gap per shard
            "driver_busy": gpus * gap / a.gpu_s_per_shard,  # the driver's serial loop: gaps per second of job
            "worker_bucket_share": worker_s / (a.gpu_s_per_shard + worker_s),
            "upload_share_alone": up_alone / (a.gpu_s_per_shard + up_alone),
            "upload_share_shared": up_shared / (a.gpu_s_per_shard + up_shared),
            "node_link_busy": min(gpus, a.gpus_per_node) * up_alone / a.gpu_s_per_shard,
            "bucket_mb_per_s": gpus * shard_bytes / a.gpu_s_per_shard / 1e6,
            "scan_share": scan_s / (job_s + scan_s), "rescan_share": rescan_s / (job_s + rescan_s),
            "index_share": index_s / (job_s + index_s)}
    return {"assumptions": {"gpu_s_per_shard": a.gpu_s_per_shard, "samples_per_shard": a.samples_per_shard,
                            "job_samples": a.job_samples, "shards": shards, "node_gb_per_s": a.node_gb_per_s,
                            "gpus_per_node": a.gpus_per_node, "request_ms": a.request_ms, "batch_size": a.batch_size,
                            "worker_requests_per_shard": worker_requests, "worker_bucket_s_per_shard": worker_s,
                            "sample_bytes_toy_scaled": toy_scaled, "sample_bytes_synthetic": sum(syn.values()),
                            "sample_bytes_used": sample, "shard_bytes": shard_bytes},
            "job_seconds": {"scan_fresh": scan_s, "scan_rerun": rescan_s, "indexes": index_s}, "gpus": rows}


def measure(a: argparse.Namespace, work: Path) -> dict:
    import ray

    load0 = os.getloadavg()
    lines = [ln.strip() for ln in (ROOT / "prompts" / "toy.txt").read_text().splitlines()]
    prompts = [ln for ln in lines if ln and not ln.startswith("#")][: a.prompts]
    args = (prompts, a.images, a.shard_size, a.steps)
    res: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
                            f"{torch.__version__} ({torch.get_num_threads()} threads), ray {ray.__version__}",
                 "job": {"prompts": len(prompts), "images_per_prompt": a.images, "shard_size": a.shard_size,
                         "steps": a.steps}}
    if ray.is_initialized():
        raise RuntimeError("this process already runs Ray: the bench starts its own (2 CPUs)")
    events = work / "events.jsonl"
    if __name__ != "__main__":  # loaded by file (tests): Ray's workers cannot import this module by name
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with s3_server() as bucket, environ(**{EVENTS: str(events), "MMDIFF_STAGING": str(work / "staging")}):
        t0 = time.perf_counter()
        # Its own cluster (address="local"), not one another process runs on this machine.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        res["ray_init_s"] = time.perf_counter() - t0
        runs: dict[str, list[dict]] = {"local": [], "ray_local": [], "ray_s3": []}
        try:
            for r in range(a.rounds):  # interleaved: each round runs the three once, each into a new dataset
                runs["local"].append(run_local(make_config(work / f"local{r}", *args, "local")))
                runs["ray_local"].append(run_ray(make_config(work / f"ray{r}", *args, "ray"), events))
                runs["ray_s3"].append(run_ray(make_config(f"{bucket}/ds{r}", *args, "ray"), events))
        finally:
            ray.shutdown()
        res |= {k: combine(v) for k, v in runs.items()}
        from mmdiff_gen.io.store import open_store

        local = work / "local0"
        info = json.loads((local / "dataset.json").read_text())
        res["pixels"] = info["sampling"]["height"] * info["sampling"]["width"]
        tars = sorted(p.name for p in local.glob("*.tar"))  # the same job: the same bytes?
        s3 = open_store(f"{bucket}/ds0")
        res["identical"] = {"ray folder": all((local / n).read_bytes() == (work / "ray0" / n).read_bytes()
                                              for n in tars),
                            "ray s3": all((local / n).read_bytes() == s3.read_bytes(n) for n in tars)}
        job = make_config(f"{bucket}/ds0", *args, "ray").job
        res["sample_bytes"] = {"toy": toy_sample_bytes(local), "synthetic_1024": synthetic_1024_bytes()}
        big = (a.samples_per_shard if not a.smoke else 4) * sum(res["sample_bytes"]["synthetic_1024"].values())
        res["bucket"] = bucket_costs(f"{bucket}/ds0", local, job, work, big)
        res["bucket"]["worker"] = worker_on_bucket(make_config(f"{bucket}/worker", *args, "local"))
    res["arithmetic"] = arithmetic(res, a)
    res["load_average"] = {"start": load0, "end": os.getloadavg()}  # other processes on the same cores skew times
    return res


def report(res: dict) -> str:
    loc, rl, rs, b = res["local"], res["ray_local"], res["ray_s3"], res["bucket"]
    j, w = res["job"], b["worker"]
    lines = [f"machine: {res['machine']}; toy backbone, --device cpu, {j['prompts']} prompts × "
             f"{j['images_per_prompt']} images, shards of {j['shard_size']}, steps {j['steps'] or 'the toy default'}; "
             f"Ray: 1 CPU worker holding both cores; the same bytes as the local run: {res['identical']}; "
             f"load average (1, 5, 15 min) at the start {res['load_average']['start']}, at the end "
             f"{res['load_average']['end']}", "",
             f"(a) wall clock (s), {len(loc['rounds'])} interleaved rounds: fixed costs their minimum; a shard: the "
             "first in a fresh process (warm-up), the later ones' median (minimum); the driver's gap: the median",
             "| run | wall | × local | fixed: worker start / load / until the 1st shard starts / tail | "
             "shard: first / later | gap between shards | fixed cost | cost per shard |",
             "|---|---|---|---|---|---|---|---|"]
    fixed = {"local": loc["load_s"] + loc["first_shard_s"] - loc["later_shard_s"]}
    per = {"local": loc["later_shard_s"]}
    lines.append(f"| local process, folder | {loc['wall_s']:.2f} | 1.000 | load {loc['load_s']:.2f} | "
                 f"{loc['first_shard_s']:.3f} / {loc['later_shard_s']:.3f} ({loc['later_shard_min_s']:.3f}) | – | "
                 f"{fixed['local']:.2f} | "
                 f"{per['local']:.3f} |")
    for key, name, r in (("ray folder", "Ray, folder", rl), ("ray s3", "Ray, loopback S3", rs)):
        warm_up = r["first_shard_s"] - r["later_shard_s"]
        fixed[key] = res["ray_init_s"] + r["until_first_shard_s"] + warm_up + r["tail_s"]
        per[key] = r["later_shard_s"] + r["gap_median_s"]
        lines.append(f"| {name} | {r['wall_s']:.2f} (+ cluster start {res['ray_init_s']:.2f}) | "
                     f"{r['wall_s'] / loc['wall_s']:.3f} ({(r['wall_s'] + res['ray_init_s']) / loc['wall_s']:.3f} "
                     f"with the cluster start) | {r['worker_start_s']:.2f} / {r['worker_load_s']:.2f} / "
                     f"{r['until_first_shard_s']:.2f} / {r['tail_s']:.2f} | {r['first_shard_s']:.3f} / "
                     f"{r['later_shard_s']:.3f} ({r['later_shard_min_s']:.3f}) | {r['gap_median_s'] * 1000:.1f} ms | "
                     f"{fixed[key]:.2f} | {per[key]:.3f} |")
    res["summary"] = {"fixed_s": fixed, "per_shard_s": per}
    lines.append("Ray / local: " + "; ".join(f"{k}: fixed cost {fixed[k] / fixed['local']:.2f}×, per shard "
                                            f"{per[k] / per['local']:.3f}×" for k in ("ray folder", "ray s3")))
    lines += ["", f"(b) per shard outside the worker, (Ray wall − worker time) / shards: folder "
              f"{rl['outside_worker_per_shard_s']:.2f} s, S3 {rs['outside_worker_per_shard_s']:.2f} s (fixed costs "
              f"included); the driver's gap between shards: folder {rl['gap_median_s'] * 1000:.1f} ms, S3 "
              f"{rs['gap_median_s'] * 1000:.1f} ms; the worker's later shards on S3 − on a folder: "
              f"{(rs['later_shard_s'] - rl['later_shard_s']) * 1000:+.0f} ms (median), "
              f"{(rs['later_shard_min_s'] - rl['later_shard_min_s']) * 1000:+.0f} ms (minimum)",
              f"a worker's shard on the bucket ({w['batches']} batch): {w['requests_per_shard']:.0f} S3 requests "
              f"({', '.join(f'{m} {c}' for m, c in w['requests'].items())}), {w['stores_per_shard']:.0f} stores opened"]
    for k, label in (("upload", "one toy shard's upload"), ("upload_1024", "one 1024² shard's bytes uploaded")):
        lines.append(f"{label} to loopback S3: {b[k]['bytes']:,} bytes in {b[k]['s'] * 1000:.1f} ms "
                     f"({b[k]['mb_per_s']:.0f} MB/s)")
    for k, label in (("scan_fresh", "resume scan, new dataset"), ("scan_finished", "resume scan, finished dataset"),
                     ("indexes", "sizes.json + shardindex.json")):
        lines.append(f"driver's {label}: {b[k]['s_per_shard'] * 1000:.1f} ms, {b[k]['requests_per_shard']:.1f} "
                     f"S3 requests and {b[k]['stores_per_shard']:.1f} stores opened per shard "
                     f"({', '.join(f'{m} {c}' for m, c in b[k]['requests'].items())})")
    lines.append(f"one HEAD through open_store(url) (one store per URL and process): "
                 f"{b['head_open_store_s'] * 1000:.1f} ms; through a new FsspecStore (a new s3fs filesystem and "
                 "botocore client): "
                 f"{b['head_new_filesystem_s'] * 1000:.1f} ms")
    toy = res["sample_bytes"]["toy"]
    ar = res["arithmetic"]
    s = ar["assumptions"]
    lines += [f"toy sample ({res['pixels']} px): " + ", ".join(f"{k} {v:.0f}" for k, v in toy.items())
              + " bytes; synthetic 1024²: "
              + ", ".join(f"{k} {v:,}" for k, v in res["sample_bytes"]["synthetic_1024"].items()),
              "", "(c) ARITHMETIC (not measured): FLUX.1-dev 1024², "
              f"{s['samples_per_shard']} samples ≈ {s['gpu_s_per_shard']:.0f} GPU-s per shard, batch "
              f"{s['batch_size']}, a job of {s['job_samples']:,} samples = {s['shards']:,} shards; a 1024² sample = "
              f"{s['sample_bytes_used'] / 1e6:.2f} MB (toy × pixel count {s['sample_bytes_toy_scaled'] / 1e6:.2f} MB, "
              f"synthetic {s['sample_bytes_synthetic'] / 1e6:.2f} MB: the larger), a shard "
              f"{s['shard_bytes'] / 1e6:.0f} MB; "
              f"{s['node_gb_per_s']} GB/s upload per node of {s['gpus_per_node']} GPUs; {s['request_ms']} ms per S3 "
              f"request; a worker's bucket work per shard besides the upload {s['worker_bucket_s_per_shard']:.2f} s "
              f"({s['worker_requests_per_shard']:.0f} requests); the driver's gap and per-shard work as measured here",
              "| GPUs | job (h) | driver gap, share per GPU | driver loop busy | worker's bucket requests, share | "
              "upload share (alone / all GPUs of a node at once) | into the bucket (MB/s) | driver's resume scan "
              "(new / rerun) | driver's indexes at the end |", "|---|---|---|---|---|---|---|---|---|"]
    for g, r in ar["gpus"].items():
        lines.append(f"| {g} | {r['job_hours']:.1f} | {r['driver_gap_share'] * 100:.4f}% | "
                     f"{r['driver_busy'] * 100:.2f}% | "
                     f"{r['worker_bucket_share'] * 100:.2f}% | "
                     f"{r['upload_share_alone'] * 100:.3f}% / {r['upload_share_shared'] * 100:.3f}% | "
                     f"{r['bucket_mb_per_s']:.0f} | {r['scan_share'] * 100:.2f}% / {r['rescan_share'] * 100:.2f}% | "
                     f"{r['index_share'] * 100:.2f}% |")
    js = ar["job_seconds"]
    lines.append(f"(the driver's serial bucket work, once per job: resume scan {js['scan_fresh']:.0f} s new / "
                 f"{js['scan_rerun']:.0f} s rerun, indexes {js['indexes']:.0f} s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="2 prompts × 2 images, shards of 2, 4 steps")
    ap.add_argument("--prompts", type=int, default=6, help="the first N prompts of prompts/toy.txt")
    ap.add_argument("--images", type=int, default=4, help="images per prompt")
    ap.add_argument("--shard-size", type=int, default=3)
    ap.add_argument("--steps", type=int, help="sampling steps (default: the toy's own)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repeats of the three runs")
    ap.add_argument("--json", help="also write the figures to this file")
    g = ap.add_argument_group("(c) assumptions")
    g.add_argument("--gpu-s-per-shard", type=float, default=300.0, help="jobs/plan.py: ≈ 5 GPU-minutes per shard")
    g.add_argument("--samples-per-shard", type=int, default=64, help="jobs/plan.py's default at 1024²")
    g.add_argument("--job-samples", type=int, default=1_000_000)
    g.add_argument("--node-gb-per-s", type=float, default=1.0, help="upload bandwidth per node, GB/s")
    g.add_argument("--gpus-per-node", type=int, default=8)
    g.add_argument("--request-ms", type=float, default=20.0, help="one S3 request from a node in the region")
    g.add_argument("--batch-size", type=int, default=4, help="generate's default batch at 1024²")
    a = ap.parse_args(argv)
    if a.smoke:
        a.prompts, a.images, a.shard_size, a.steps, a.rounds = 2, 2, 2, 4, 1
    work = Path(tempfile.mkdtemp(prefix="bench_ray_"))  # datasets, staging, the workers' log: removed after
    try:
        res = measure(a, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(report(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
