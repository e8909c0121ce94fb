"""`generate --engine ray`: Ray schedules whole shards onto workers that each load the model once.

The shard stays the unit of work, resume and integrity: a worker is a Ray actor holding a `DatasetGenerator`
(one GPU each, or CPU workers), handed one unfinished shard at a time, which it writes exactly as a local worker
does (claimed, staged on its own disk, published whole, marker last). The driver only schedules:

- it asks for `workers` actors at once; those the cluster cannot place yet stay pending and join when nodes
  do (an autoscaler adds nodes for pending actors), so workers may join while the job runs;
- the first worker to be ready writes (or checks) dataset.json; the driver then reads the done markers itself and
  queues only the unfinished shards (resume);
- a worker that dies (killed, preempted, out of memory) loses nothing visible: its shard was only on its own disk;
  the driver breaks that shard's claim (it chose the claim's token), queues the shard again and starts a
  replacement worker. A shard that has killed `MAX_ATTEMPTS` workers stops the job (something in it is broken);
- at the end the driver writes sizes.json and the wids index once, from the markers.
"""

from __future__ import annotations

import os
import re
import socket
import uuid
from collections import deque
from typing import Callable

from ..io.shards import break_claim, shard_name
from ..io.store import open_store
from .._workers import shard_ranges
from ._progress import JobProgress
from .dataset_job import JobReport, unfinished_shards, write_dataset_indexes
from .generator import GenerateConfig

MAX_ATTEMPTS = 3  # workers a single shard may lose before the job stops


def _ray():
    try:
        import ray
    except ImportError as e:
        raise ImportError("--engine ray needs Ray: pip install 'mmdiff-gen[ray]'") from e
    return ray


class _Worker:
    """A Ray actor: one loaded generator, writing the shards it is handed."""

    def __init__(self, config: GenerateConfig, threads: int | None):
        if threads:
            import torch

            torch.set_num_threads(threads)
        from ..io.shards import remove_dead_temporaries
        from .generator import DatasetGenerator

        self.gen = DatasetGenerator(config)
        self.seen = False
        remove_dead_temporaries(config.job.out)  # a killed worker's staged shard on this host

    def identity(self) -> str:
        return f"{socket.gethostname()} pid {os.getpid()} on {self.gen.device}"

    def prepare(self) -> tuple[dict, object]:
        """dataset.json written or checked; (it, the job resolved for this backbone)."""
        return self.gen.prepare(0), self.gen.job

    def write(self, shard: int, token: str) -> JobReport:
        if not self.seen:  # once: this worker writes into the dataset the first one prepared
            from ..io.shards import DATASET_FILE, read_json

            out = self.gen.job.out
            if (read_json(open_store(out), DATASET_FILE) or {}).get("fingerprint") != self.gen.producer.info["fingerprint"]:
                raise RuntimeError(f"the worker on {socket.gethostname()} does not see this job's {DATASET_FILE} in "
                                   f"{out} (or made it from other inputs: other heads or weights there?): a local "
                                   "--out must be one folder every node shares (NFS, Lustre); or use s3://… / gs://…")
            self.seen = True
        return self.gen.write_shard(shard, token)


def _worker_plan(ray, config: GenerateConfig) -> tuple[int, dict]:
    """(workers, resources per worker): one GPU each unless the device is the CPU (or auto without GPUs)."""
    total = ray.cluster_resources()
    gpus = int(total.get("GPU", 0))
    if config.device != "cpu" and (gpus or config.device != "auto"):
        return config.workers or max(gpus, 1), {"num_gpus": 1, "num_cpus": 1}
    cpus = int(total.get("CPU", 1))
    n = config.workers or max(cpus, 1)
    return n, {"num_cpus": max(cpus // n, 1)}


def run_ray(config: GenerateConfig, progress: bool = True, say: Callable[[str], None] = lambda _: None) -> JobReport:
    """Run the whole dataset job on a Ray cluster (`config.ray_address`, else the running one, else a local one);
    returns the sum of the workers' reports."""
    ray = _ray()
    if not ray.is_initialized():
        ray.init(address=config.ray_address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    n, resources = _worker_plan(ray, config)
    threads = resources["num_cpus"] if "num_gpus" not in resources else None
    actor_class = ray.remote(max_restarts=0, **resources)(_Worker)
    store = open_store(config.job.out)
    report = JobReport(rank=0, world_size=n, shards_owned=0)
    starting: dict = {}  # ready ref → actor
    idle: list = []
    busy: dict = {}  # write ref → (actor, shard, token)
    names: dict = {}  # actor → identity
    attempts: dict[int, int] = {}
    wrote: dict[str, int] = {}  # worker → shards it finished

    def start(k: int) -> None:
        for _ in range(k):
            a = actor_class.remote(config, threads)
            starting[a.identity.remote()] = a

    start(n)
    say(f"ray: {n} worker(s) requested ({', '.join(f'{k[4:]} {v}' for k, v in resources.items())} each) "
        f"on a cluster of {ray.cluster_resources().get('GPU', 0):.0f} GPU(s), "
        f"{ray.cluster_resources().get('CPU', 0):.0f} CPU(s)")
    bar = None
    queue: deque[int] = deque()
    info = job = None
    try:
        while starting or busy or (queue and idle) or info is None:
            if not starting and not busy and info is None:
                raise RuntimeError("no Ray worker could start")
            done, _ = ray.wait(list(starting) + list(busy), num_returns=1, timeout=5.0)
            for ref in done:
                if ref in starting:
                    a = starting.pop(ref)
                    try:
                        names[a] = ray.get(ref)
                    except ray.exceptions.RayActorError as e:
                        if info is None and not names:  # no worker ever started: a setting, not bad luck
                            raise RuntimeError(f"a Ray worker could not start: {_cause(e)}") from None
                        report.workers_lost += 1
                        say(f"ray: a worker could not start ({_cause(e)})")
                        continue
                    if info is None:
                        info, job = _get(ray, a.prepare.remote())
                        queue.extend(unfinished_shards(job, info, range(info["num_shards"]), report))
                        ranges = [len(r) for r in shard_ranges(info["num_samples"], job.shard_size)]
                        bar = JobProgress(sum(ranges[s] for s in queue), "ray", enabled=progress)
                        report.shards_owned = info["num_shards"]
                    say(f"ray: worker {names[a]} ready ({len(busy) + len(idle) + 1} working)")
                    idle.append(a)
                else:
                    a, shard, token = busy.pop(ref)
                    try:
                        rep = _get(ray, ref)
                    except ray.exceptions.RayActorError as e:
                        break_claim(store, shard, token)  # its holder is dead: the shard need not wait an hour
                        attempts[shard] = attempts.get(shard, 0) + 1
                        report.workers_lost += 1
                        if attempts[shard] >= MAX_ATTEMPTS:
                            raise RuntimeError(f"shard {shard_name(shard)} lost {attempts[shard]} workers; last: "
                                               f"{_cause(e)}") from None
                        say(f"ray: worker {names.pop(a, '?')} died while writing shard {shard_name(shard)} "
                            f"({_cause(e)}); the shard goes to another worker")
                        queue.appendleft(shard)
                        start(1)
                        continue
                    report.add(rep)
                    wrote[names.get(a, "?")] = wrote.get(names.get(a, "?"), 0) + 1
                    bar.advance(ranges[shard])
                    for stage, t in rep.seconds.items():
                        bar.add_time(stage, t)
                    idle.append(a)
            while queue and idle:
                a, shard, token = idle.pop(), queue.popleft(), uuid.uuid4().hex
                busy[a.write.remote(shard, token)] = (a, shard, token)
            if info is not None and not queue:
                for a in idle:  # nothing left for them: give their GPUs back
                    ray.kill(a)
                idle.clear()
                for ref, a in list(starting.items()):
                    ray.kill(a)
                    starting.pop(ref)
    finally:
        for a in idle + [a for a, _, _ in busy.values()] + list(starting.values()):
            ray.kill(a)
        if bar is not None:
            bar.close()
        if info is not None:
            write_dataset_indexes(store, info)
    if queue:  # every worker lost and none could start again: say so rather than end as if finished
        raise RuntimeError(f"{len(queue)} shard(s) left unwritten: no Ray worker could start to write them; re-run "
                           "the same command to resume")
    left = unfinished_shards(job, info, range(info["num_shards"]), None)
    if left:  # claimed elsewhere: another job, or a worker that died on another host (its claim expires in an hour)
        raise RuntimeError(f"{len(left)} shard(s) not finished ({', '.join(shard_name(s) for s in left[:5])}): "
                           "claimed by another process; re-run the same command once it is gone to finish them")
    report.seconds = dict(bar.stages) if bar is not None else {}
    if wrote:
        say("ray: shards per worker: " + "; ".join(f"{w}: {k}" for w, k in wrote.items()))
    return report


def _get(ray, ref):
    """ray.get, raising a worker's own exception (a FingerprintMismatch stays one) instead of Ray's wrapper."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, BaseException):
            raise cause from None
        raise


def _cause(e: Exception) -> str:
    """Why an actor died, in one line: the last `SomeError: message` line of Ray's report, else its first line."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Exit|Interrupt)\b.*:", ln)]
    return (errors[-1] if errors else lines[0] if lines else type(e).__name__)[:300]
