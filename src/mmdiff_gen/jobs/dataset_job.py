"""The dataset job: one generation pass per batch of prompts → images with their label maps, in shards.

Flow per shard this worker owns: plan (jobs.plan) → generate + capture (capture.generate) → heads
(jobs.annotate) → encode (io.members) → ShardWriter (io.shards), whose stats file is written last. A
finished shard is never touched again; re-running the same command redoes only the others.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .. import __version__
from ..backbones.base import Backbone
from ..capture import generate
from ..errors import SettingsError
from ..io.dataset import index_entries
from ..io.members import IGNORE_INDEX, VIDEO_FORMAT, encode_sample, label_info, label_member
from ..io.shards import (DATASET_FILE, PipelinedWriter, ShardClaim, ShardWriter, changed_files, clear_dataset,
                         file_digest, files_layout,
                         read_json, read_stats, recover_replacements, remove_dead_temporaries,
                         remove_shard_temporaries, shard_name, shard_problem, stats_name, write_indexes, write_json)
from ..io.store import Store, is_remote, open_store
from ..tasks import TASKS, quality_tasks
from ..tasks import get as get_task
from ._progress import JobProgress
from .annotate import Annotator
from .._workers import owned_shards, shard_order, shard_ranges
from .plan import SEED_POLICY, PlannedSample, default_shard_size, plan_samples

FORMAT_VERSION = 1
MAX_FAILED_SHARDS = 3  # consecutive shards in which every sample failed: stop the job


class Interrupted(BaseException):
    """SIGINT / SIGTERM / SIGUSR1 reached the job; the open shard was discarded.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way can swallow it.
    """

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class FingerprintMismatch(SettingsError):
    """The output folder holds a dataset made from other inputs."""


class _LostClaim(Exception):
    """Another process now holds the claim of the shard being written (it took over a claim judged stale)."""


# A setting's name where the user gave it: the CLI's option (the library's keyword beside it in the docs).
OPTIONS = {"num_inference_steps": "--steps", "height": "--size", "width": "--size", "guidance_scale": "--guidance",
           "true_cfg_scale": "--true-cfg", "min_quality": "--min-quality", "images_per_prompt": "--images-per-prompt",
           "batch_size": "--batch-size", "shard_size": "--shard-size"}


def check_sampling(**values) -> None:
    """Refuse sampling values no sample can be made with. Keys: num_inference_steps, guidance_scale,
    true_cfg_scale, min_quality, height, width (None = unset, not checked)."""
    for name, v in values.items():
        if v is None:
            continue
        option = OPTIONS.get(name, name)
        if name in ("num_inference_steps", "height", "width", "images_per_prompt", "batch_size", "shard_size"):
            if v < 1:
                raise SettingsError(f"{option} must be ≥ 1, got {v}")
        elif not math.isfinite(v):
            raise SettingsError(f"{option} must be a finite number, got {v}")
        elif name == "min_quality" and not 0.0 <= v <= 1.0:
            raise SettingsError(f"{option} must be in [0, 1] (quality scores are), got {v}")
        elif v < 0:
            raise SettingsError(f"{option} must be ≥ 0, got {v}")


@dataclass(frozen=True)
class GenerateJob:
    """Everything that defines a dataset run besides the backbone and the heads.

    Args:
        out: output folder, or a URL fsspec reaches (s3://bucket/prefix, gs://…; io.store).
        tasks: registered tasks (tasks.py: "seg", "saliency", "depth", "openseg" — zero-shot, from the grounding
            attention).
        images_per_prompt: samples per prompt (repeat r of prompt p has seed sample_seed(seed, p, r)).
        seed: global seed.
        batch_size: prompts per generation pass (does not change which samples exist or their seeds).
        height, width, num_inference_steps, guidance_scale, true_cfg_scale, negative_prompt,
            max_sequence_length: sampling settings, as in FluxPipeline; None: the backbone's (`run_generate`
            fills them in from `Backbone.sampling_kwargs` before anything is written).
        image_format: "jpg" (quality 95, 4:4:4) or "png"; a video backbone's clips are "mp4" (io.members), set by
            `resolved`.
        num_frames: a video backbone's clip length (4k + 1 for Wan); None: its default; images: must stay None.
        format: "webdataset" (NNNNN.tar shards) or "files" (images/, seg/, saliency/, depth/, meta/).
        shard_size: samples per shard; None: plan.default_shard_size at the image size (minutes of GPU time).
        store_dtype: dtype of the captured features (bfloat16 keeps FLUX's large activations).
        min_quality: samples whose quality score is below it are not written (status "filtered").
        overwrite: replace a dataset made from other inputs instead of refusing.
        retry_failed: also redo finished shards that recorded failed samples.
        write_workers: threads that encode samples while the next batch generates (0: in the main thread);
            None: 2 when the backbone computes on a GPU, 0 on a CPU, whose cores the backbone already uses
            (BENCHMARKS.md: writer threads slowed CPU generation on a 2-core machine).
    """

    out: Path | str
    tasks: tuple[str, ...]
    images_per_prompt: int = 1
    seed: int = 0
    batch_size: int = 4
    height: int | None = None
    width: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    true_cfg_scale: float | None = None
    negative_prompt: str | None = None
    max_sequence_length: int | None = None
    image_format: str = "jpg"
    num_frames: int | None = None
    format: str = "webdataset"
    shard_size: int | None = 1000
    store_dtype: str = "bfloat16"
    min_quality: float | None = None
    overwrite: bool = False
    retry_failed: bool = False
    write_workers: int | None = None

    def __post_init__(self):
        # A URL stays a string (Path would fold its "//"); a local location is a Path.
        object.__setattr__(self, "out", str(self.out) if is_remote(self.out) else Path(str(self.out).removeprefix("file://")))
        object.__setattr__(self, "tasks", tuple(self.tasks))
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise SettingsError(f"unknown tasks {bad}; choose from {', '.join(TASKS)}")
        check_sampling(**{k: getattr(self, k) for k in ("images_per_prompt", "batch_size", "shard_size",
                                                          "num_inference_steps", "height", "width", "guidance_scale",
                                                          "true_cfg_scale", "min_quality")})
        if self.image_format not in ("jpg", "png", VIDEO_FORMAT):
            raise SettingsError(f"image format must be jpg or png, got {self.image_format!r}")
        if self.num_frames is not None and self.num_frames < 1:
            raise SettingsError(f"--frames must be ≥ 1, got {self.num_frames}")
        if self.format not in ("webdataset", "files"):
            raise SettingsError(f"format must be webdataset or files, got {self.format!r}")

    def resolved(self, backbone: Backbone) -> "GenerateJob":
        """This job with its unset sampling settings (None) filled in by the backbone (`sampling_kwargs`)."""
        keys = ("height", "width", "num_inference_steps", "guidance_scale", "true_cfg_scale", "negative_prompt",
                "max_sequence_length", "num_frames")
        if self.num_frames is not None and not backbone.VIDEO:
            raise SettingsError(f"--frames {self.num_frames}: {backbone.family} generates images, not clips")
        job = replace(self, **backbone.sampling_kwargs(**{k: getattr(self, k) for k in keys}))
        if backbone.VIDEO:
            try:
                backbone.latent_frames(job.num_frames)
            except ValueError as e:
                raise SettingsError(f"--frames {job.num_frames}: {e}") from None
            job = replace(job, image_format=VIDEO_FORMAT)
        return job if job.shard_size else replace(job, shard_size=default_shard_size(job.height, job.width))

    def sampling(self) -> dict:
        """The settings that change the pixels (part of the fingerprint)."""
        keys = ("images_per_prompt", "seed", "height", "width", "num_inference_steps", "guidance_scale",
                "true_cfg_scale", "negative_prompt", "max_sequence_length", "store_dtype")
        clip = {"num_frames": self.num_frames} if self.num_frames is not None else {}  # images' fingerprints unchanged
        return {k: getattr(self, k) for k in keys} | clip


@dataclass
class JobReport:
    """What one worker did in one run."""

    rank: int
    world_size: int
    shards_owned: int
    shards_skipped: int = 0
    shards_written: int = 0
    shards_busy: int = 0  # claimed by another live process (a duplicate worker): left to it
    shards_damaged: int = 0  # finished before, but their files no longer matched the done marker: redone
    shards_failed: int = 0  # every sample failed: not marked done, a re-run redoes them
    shards_taken_over: int = 0  # another worker's, unclaimed and unfinished when this one ran out of its own
    samples_written: int = 0
    samples_failed: int = 0
    samples_filtered: int = 0
    workers_lost: int = 0  # Ray: workers that died (killed, preempted, out of memory); their shards were redone
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, other: "JobReport") -> None:
        """Count another report's shards, samples and seconds into this one (a scheduler's sum over workers)."""
        for k, v in asdict(other).items():
            if k == "seconds":
                for stage, t in v.items():
                    self.seconds[stage] = self.seconds.get(stage, 0.0) + t
            elif k.startswith(("shards_", "samples_")) and k != "shards_owned":
                setattr(self, k, getattr(self, k) + v)


def dataset_info(job: GenerateJob, prompts: list[str], backbone: Backbone, annotator: Annotator, dtype: str) -> dict:
    """dataset.json: the effective config, the input fingerprint and what a reader needs to decode labels."""
    heads = annotator.identity()
    # How the weights are held (fp8 / int8 storage, offload) is recorded; storage changes pixels slightly, so a
    # resumed run must not mix it with another (offload does not change what is computed).
    runtime = dict(getattr(backbone, "runtime", None) or {"offload": "none", "storage": "full"})
    inputs = {"prompts": prompts, "tasks": list(job.tasks), "sampling": job.sampling(), "dtype": dtype,
              "backbone": backbone.identity(), "heads": {t: h["sha256"] for t, h in heads.items()},
              "storage": runtime.get("storage", "full"),
              "openseg": heads.get("openseg"), "min_quality": job.min_quality,
              "shard_size": job.shard_size, "format": job.format, "image_format": job.image_format}
    fingerprint = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    n = len(prompts) * job.images_per_prompt
    members = [job.image_format, "txt", "json"] + [label_member(t, job.image_format == VIDEO_FORMAT) for t in job.tasks]
    return {
        "format_version": FORMAT_VERSION,
        "code_version": __version__,
        "fingerprint": fingerprint,
        "format": job.format,
        "image_format": job.image_format,
        "members": members,
        "tasks": list(job.tasks),
        "num_prompts": len(prompts),
        "num_samples": n,
        "shard_size": job.shard_size,
        "num_shards": (n + job.shard_size - 1) // job.shard_size,
        "sampling": job.sampling(),
        "dtype": dtype,
        "seed_policy": SEED_POLICY,
        "key": "zero-padded global sample index, 9 digits: prompt_index × images_per_prompt + repeat",
        "backbone": backbone.identity(),
        "runtime": runtime,
        "heads": heads,
        "classes": annotator.classes,
        "palette": annotator.palette,
        "ignore_index": IGNORE_INDEX,
        "config": job_config(job),
        # per task: how its member is encoded (openseg: also its config; its ids index openseg.classes)
        **{t: label_info(t, annotator.depth_unit, job.image_format == VIDEO_FORMAT) for t in job.tasks},
        **({"openseg": annotator.openseg.to_dict() | {
            "encoding": "uint8 PNG of ids into openseg.classes, 0 = background"}} if annotator.openseg else {}),
        "quality": {"field": "json member's quality.score (mean of the signals beside it)",
                    "min_quality": job.min_quality},
    }


def prepare_output(job: GenerateJob, info: dict, rank: int = 0, wait_s: float = 600.0) -> None:
    """Create the folder (or check the bucket) and dataset.json, or check that an existing one was made from the
    same inputs.

    `--overwrite` of a dataset made from other inputs replaces it as a whole (`io.shards.clear_dataset`):
    `out/*.tar` shows the old shards, all of them, until the new dataset takes the folder. Only rank 0
    replaces; the other workers wait for its dataset.json, so none of them writes into the old dataset.
    """
    store = open_store(job.out)
    store.prepare()
    recover_replacements(store)
    folders = {f for f, _ in files_layout().values()}
    ours = [n for n in store.names("*") if n.endswith(".tar") or n in folders]
    old = read_json(store, DATASET_FILE)  # after listing: a worker that started a moment earlier wrote it first
    if old is not None and old.get("fingerprint") == info["fingerprint"]:
        return
    if old is None and not ours:
        # Two workers starting at once write the same bytes; on an object store, the first upload wins.
        write_json(store, DATASET_FILE, info)
        return
    if not job.overwrite:
        what = "a dataset made from other inputs (prompts, settings, backbone or heads)" if old is not None else \
            f"shards without a {DATASET_FILE} ({', '.join(sorted(ours)[:3])})"
        raise FingerprintMismatch(f"{job.out} holds {what}; use another --out, or --overwrite to replace it")
    if rank == 0:
        old_tree = clear_dataset(store)
        write_json(store, DATASET_FILE, info)  # first: the other workers wait for it
        if old_tree is not None:
            shutil.rmtree(old_tree, ignore_errors=True)
        return
    deadline = time.monotonic() + wait_s
    while (read_json(store, DATASET_FILE) or {}).get("fingerprint") != info["fingerprint"]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{job.out}: worker 0 has not replaced the old dataset after {wait_s:.0f} s "
                               "(only worker 0 replaces it under --overwrite; is it running?)")
        time.sleep(1.0)


@contextmanager
def _signals_raise():
    """SIGINT, SIGTERM and SIGUSR1 (SLURM's warning) raise Interrupted in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    names = [s for s in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, s)]
    fired = []

    def handler(signum, _frame):
        if not fired:  # a second signal must not cut the clean-up of the first short
            fired.append(signum)
            raise Interrupted(signum)

    old = {n: signal.signal(getattr(signal, n), handler) for n in names}
    try:
        yield
    finally:
        for n, h in old.items():
            signal.signal(getattr(signal, n), h)


class _Runner:
    """Generates and annotates batches; isolates a failing sample by retrying its batch one by one."""

    def __init__(self, backbone: Backbone, annotator: Annotator, job: GenerateJob, progress: JobProgress):
        self.bb, self.ann, self.job, self.progress = backbone, annotator, job, progress
        self.spec = annotator.spec(store_dtype=job.store_dtype)
        self.done_one = False  # whether a batch of this run has produced at least one sample

    def batch(self, samples: list[PlannedSample]) -> list[tuple[np.ndarray, dict, list[float], dict] | str]:
        try:
            return self._batch(samples)
        except OSError:  # disk trouble is the job's, not the sample's
            raise
        except Exception as e:  # noqa: BLE001 — recorded per sample, the run goes on
            if device_failure(e) == "broken":
                raise
            error = f"{type(e).__name__}: {e}"
        # Out of the except block: the traceback, and the activations its frames hold, are gone.
        _free_memory(self.bb)
        if len(samples) == 1:
            return [error]
        return [r for s in samples for r in self.batch([s])]

    def _batch(self, samples):
        j = self.job
        t0 = time.perf_counter()
        gen = generate(self.bb, [s.prompt for s in samples], self.spec, seeds=[s.seed for s in samples],
                       height=j.height, width=j.width, num_inference_steps=j.num_inference_steps,
                       guidance_scale=j.guidance_scale, true_cfg_scale=j.true_cfg_scale,
                       negative_prompt=j.negative_prompt, max_sequence_length=j.max_sequence_length,
                       num_frames=j.num_frames)
        t1 = time.perf_counter()
        cap = gen.capture
        ann = self.ann(cap, (j.height, j.width), images=gen.images, prompts=[s.prompt for s in samples])
        t2 = time.perf_counter()
        self.progress.add_time("backbone", t1 - t0)
        self.progress.add_time("heads", t2 - t1)
        finite = torch.isfinite(cap.features.flatten(1)).all(1).cpu()  # (B,) a NaN here poisons every label
        results = []
        for i, image in enumerate(gen.images):
            if not finite[i]:
                results.append("non-finite features (float16 overflow? use bfloat16 or float32)")
                continue
            pixels = np.stack([np.asarray(f.convert("RGB")) for f in image]) if j.num_frames else np.asarray(
                image.convert("RGB"))  # (F, H, W, 3) for a clip
            results.append((pixels, {t: v[i].numpy() for t, v in ann.labels.items()},
                            [float(x) for x in cap.sigmas[i]], ann.quality[i]))
        return results


# How a failure's message reads: an allocation that failed (the batch retries one sample at a time) or a device
# left unusable (device-side assert, illegal address: every later sample would fail too, so the job stops).
# Allocation failures come first: cuBLAS / cuDNN report an OOM as "CUBLAS_STATUS_ALLOC_FAILED" inside a
# "CUDA error" message.
OUT_OF_MEMORY = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED", "CUFFT_ALLOC_FAILED",
                 "cudaErrorMemoryAllocation", "CUDA_ERROR_OUT_OF_MEMORY")
DEVICE_BROKEN = ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "illegal memory access", "device-side assert",
                 "cudaError", "CUDA_ERROR")


def device_failure(e: BaseException) -> str | None:
    """"oom" (recoverable: memory freed, the batch retried sample by sample), "broken" (the CUDA context is
    unusable) or None (not the device's)."""
    text = str(e)
    if isinstance(e, torch.OutOfMemoryError) or any(s in text for s in OUT_OF_MEMORY):
        return "oom"
    accel = getattr(torch, "AcceleratorError", None)
    if (accel is not None and isinstance(e, accel)) or any(s in text for s in DEVICE_BROKEN):
        return "broken"
    return None


def _free_memory(backbone: Backbone | None = None) -> None:
    """After a failed batch: what it held goes. Under model offload diffusers moves the transformer back to the CPU
    only at the end of a successful call, so a retry would encode its prompts with T5 beside it: put it back."""
    if backbone is not None:
        free = getattr(backbone.pipe, "maybe_free_model_hooks", None)
        if free is not None:
            free()
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class ShardProducer:
    """One process's side of a dataset job: the job resolved for its backbone, dataset.json, the plan, and
    `write(shard)`. `run_generate` loops over a worker's shards with it; a Ray worker (jobs.ray_engine) is
    handed shards one at a time.

    Args:
        backbone, annotator: loaded once; every shard this process writes uses them.
        prompts: the dataset's prompts, in order (keys follow it).
        job: the dataset's settings (unset sampling values are the backbone's).
        dtype: the compute dtype's name (recorded in dataset.json and its fingerprint).
    """

    def __init__(self, backbone: Backbone, annotator: Annotator, prompts: list[str], job: GenerateJob,
                 dtype: str = "float32"):
        job = job.resolved(backbone)
        missing = [t for t in job.tasks if t not in annotator.tasks]
        if missing:
            raise ValueError(f"the heads have no {', '.join(missing)} head")
        _check_settings(backbone, annotator, job)
        self.job, self.store = job, open_store(job.out)
        self.info = dataset_info(job, prompts, backbone, annotator, dtype)
        self.plan = plan_samples(prompts, job.images_per_prompt, job.seed)
        self.ranges = shard_ranges(len(self.plan), job.shard_size)
        self.runner = _Runner(backbone, annotator, job, JobProgress(0, enabled=False))

    def prepare(self, rank: int = 0) -> None:
        """dataset.json written or checked (see `prepare_output`); this host's dead temporaries removed."""
        prepare_output(self.job, self.info, rank)
        remove_dead_temporaries(self.store)  # of killed runs on this host; live writers' files are theirs

    def finished(self, shard: int, report: "JobReport | None" = None) -> bool:
        """Whether a shard is done and whole (sizes match its marker); counts skipped and damaged shards."""
        return shard_finished(self.job, self.info, shard, report)

    def write(self, shard: int, report: "JobReport", bar: JobProgress, *, mine: bool = True,
              token: str | None = None) -> list[str] | None:
        """Claim, generate and publish one shard. Returns the errors of its failed samples, or None when the shard
        was not written here (another live process holds its claim, or finished it meanwhile). `token` names the
        claim (a scheduler that may have to break a dead worker's chooses it)."""
        claim = ShardClaim(self.store, shard, token)
        if not claim.acquire():
            report.shards_busy += mine  # a duplicate worker writes it; it is not ours to redo
            return None
        try:
            if shard_finished(self.job, self.info, shard, None):  # finished by another process since we looked
                report.shards_skipped += mine
                return None
            remove_shard_temporaries(self.store, shard)  # we hold the claim: other writers of it are gone
            if not mine:
                report.shards_taken_over += 1
                bar.total += len(self.ranges[shard])
            self.runner.progress = bar
            return _write_shard(shard, [self.plan[i] for i in self.ranges[shard]], self.runner, self.job, self.info,
                                report, bar, claim)
        except _LostClaim:
            report.shards_busy += mine
            return None
        finally:
            claim.release()

    def write_indexes(self) -> None:
        write_dataset_indexes(self.store, self.info)


def run_generate(backbone: Backbone, annotator: Annotator, prompts: list[str], job: GenerateJob, *,
                 rank: int = 0, world_size: int = 1, dtype: str = "float32", progress: bool = True) -> JobReport:
    """Produce (or finish) this worker's shards of the dataset. Re-running it resumes."""
    return run_shards(ShardProducer(backbone, annotator, prompts, job, dtype), rank=rank, world_size=world_size,
                      progress=progress)


def run_shards(producer: ShardProducer, *, rank: int = 0, world_size: int = 1, progress: bool = True) -> JobReport:
    """Worker `rank` of `world_size`: its own shards first, then unclaimed unfinished ones of others."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise SettingsError(f"worker rank {rank} is not in 0…{world_size - 1}")
    producer.prepare(rank)
    ranges = producer.ranges
    mine = set(owned_shards(len(ranges), rank, world_size))
    report = JobReport(rank=rank, world_size=world_size, shards_owned=len(mine))
    # Own shards first, then unclaimed unfinished ones of others (plan.shard_order): balanced to the end.
    order = shard_order(len(ranges), rank, world_size)
    todo = set(unfinished_shards(producer.job, producer.info, [s for s in order if s in mine], report))
    todo |= set(unfinished_shards(producer.job, producer.info, [s for s in order if s not in mine], None))
    todo = [s for s in order if s in todo]
    bar = JobProgress(sum(len(ranges[s]) for s in todo if s in mine),
                      f"worker {rank}/{world_size}" if world_size > 1 else "generate", enabled=progress)
    failed_in_a_row = 0
    try:
        with _signals_raise():
            for s in todo:
                errors = producer.write(s, report, bar, mine=s in mine)
                if errors is None:
                    continue
                failed_in_a_row = failed_in_a_row + 1 if errors and len(errors) == len(ranges[s]) else 0
                if failed_in_a_row == MAX_FAILED_SHARDS:  # not bad luck: something is broken; stop burning GPU time
                    raise RuntimeError(f"every sample of the last {MAX_FAILED_SHARDS} shards failed; last error: "
                                       f"{errors[0]}")
    finally:
        bar.close()
        report.seconds = dict(bar.stages)
        try:
            producer.write_indexes()
        except OSError:
            pass  # best effort: never hide the error that brought us here
    return report


def shard_finished(job: GenerateJob, info: dict, shard: int, report: JobReport | None) -> bool:
    """Whether a shard is done and whole (sizes match its marker); counts skipped and damaged shards."""
    return _tally(_shard_state(job, info, shard), report)


def unfinished_shards(job: GenerateJob, info: dict, shards: Sequence[int], report: JobReport | None) -> list[int]:
    """The shards of `shards` that are not done and whole, checked concurrently on an object store: each check is
    a few requests, so a serial scan of 15 625 shards at 20 ms a request takes half an hour (bench/ray_engine.py)."""
    workers = SCAN_THREADS if open_store(job.out).remote else 1
    with ThreadPoolExecutor(workers) as pool:
        states = list(pool.map(lambda s: _shard_state(job, info, s), shards))
    return [s for s, state in zip(shards, states) if not _tally(state, report)]


SCAN_THREADS = 32  # concurrent marker checks on an object store (its requests wait on the network, not the CPU)


def _shard_state(job: GenerateJob, info: dict, shard: int) -> str:
    """"finished", "damaged" (its files no longer match its marker), "retry" (--retry-failed) or "unfinished"."""
    store = open_store(job.out)
    st = _marker(store, shard, info["fingerprint"])
    if st is None:
        return "unfinished"
    if shard_problem(store, st) is not None or not _unchanged(store, shard, st):
        return "damaged"
    return "retry" if job.retry_failed and st["failed"] else "finished"


def _tally(state: str, report: JobReport | None) -> bool:
    """Count a shard's state into the report; whether it is finished."""
    if report is not None:
        report.shards_damaged += state == "damaged"
        report.shards_skipped += state == "finished"
    return state == "finished"


def _unchanged(store: Store, shard: int, stats: dict) -> bool:
    """Whether the files of a finished shard that were written again since its marker (a copy, a repair, an
    edit: io.shards.changed_files) still hold the bytes it vouches for; then the marker records their new
    versions, so the next run checks them by their metadata alone again."""
    changed = changed_files(store, stats)
    if not changed:
        return True
    if any(file_digest(store, rel)[1] != stats["files"][rel]["sha256"] for rel in changed):
        return False
    for rel in changed:
        stats["files"][rel]["version"] = store.stat(rel).version
    write_json(store, stats_name(shard), stats)
    return True


def _check_settings(backbone: Backbone, annotator: Annotator, job: GenerateJob) -> None:
    """Settings errors surface here, once, not as every sample failing in turn."""
    try:
        backbone.pipeline_kwargs({"true_cfg_scale": job.true_cfg_scale})  # SD3 refuses true CFG
    except ValueError as e:
        raise SettingsError(str(e)) from None
    spec = annotator.spec(store_dtype=job.store_dtype)
    for name, layers, blocks in (("capture", spec.layers, backbone.blocks(spec.blocks)),
                                 ("openseg", spec.text_attention_layers, backbone.attention_blocks)):
        if layers and max(layers) >= len(blocks):
            raise SettingsError(f"{name} layer {max(layers)} out of range: the backbone has {len(blocks)} such blocks")
    if job.min_quality is not None and not any(get_task(t).confidence for t in annotator.tasks):
        raise SettingsError(f"min_quality needs a task with a quality signal: {', '.join(quality_tasks())}")
    check_size(backbone, job.height, job.width)


def check_size(backbone: Backbone, height: int, width: int) -> None:
    """SettingsError unless the image size is whole tokens of this backbone within its size range."""
    lo, hi = backbone.size_range
    p = backbone.pixels_per_token
    for name, v in (("height", height), ("width", width)):
        if v % p or not lo <= v <= hi:
            raise SettingsError(f"{OPTIONS[name]} {v}: the image side must be a multiple of {p} (this backbone's "
                                f"pixels per token) in {lo}…{hi}")


def _write_shard(shard: int, samples: list[PlannedSample], runner: _Runner, job: GenerateJob, info: dict,
                 report: JobReport, bar: JobProgress, claim: ShardClaim) -> list[str]:
    """Generate, annotate and write one shard; returns the errors of its failed samples.

    Batch k is encoded and written (io.shards.PipelinedWriter) while batch k + 1 generates. A shard in
    which every sample failed is not marked done (a re-run redoes it), and when every sample of the
    run's first batch fails the job stops at once with that error: a systematic fault must not burn GPU
    hours one shard at a time.
    """
    t_start = time.perf_counter()
    records = []
    encode = partial(_encode, image_format=job.image_format, classes=info["classes"])
    workers = job.write_workers if job.write_workers is not None else (0 if runner.bb.device.type == "cpu" else 2)
    with ShardWriter(open_store(job.out), shard, job.format) as writer, \
            PipelinedWriter(writer, encode, workers=workers, max_pending=2 * job.batch_size) as pipe:
        for b in range(0, len(samples), job.batch_size):
            if not claim.held():
                raise _LostClaim(shard)
            batch = samples[b : b + job.batch_size]
            results = runner.batch(batch)
            if not runner.done_one and all(isinstance(r, str) for r in results):
                raise RuntimeError(f"every sample of the first batch failed: {results[0]}")
            runner.done_one = True
            waited = pipe.waited
            for s, r in zip(batch, results):
                base = {"key": s.key, "prompt_index": s.prompt_index, "repeat": s.repeat}
                if isinstance(r, str):  # the prompt kept: no sample of it may be in the dataset to show it
                    records.append({**base, "prompt": s.prompt, "status": "error", "error": r})
                    continue
                image, labels, sigmas, quality = r
                record = {**base, "quality": quality.get("score"), "status": "ok"}
                records.append(record)
                if job.min_quality is not None and (quality.get("score") or 0.0) < job.min_quality:
                    record["status"] = "filtered"  # deterministic: a re-run would drop it again
                    record["prompt"] = s.prompt
                    continue
                meta = {**base, "seed": s.seed, "sigmas": sigmas, "quality": quality}
                pipe.put(s.key, (image, s.prompt, meta, labels), partial(_failed, record, prompt=s.prompt))
            bar.add_time("write", pipe.waited - waited)  # only the time generation waited on the writer
            bar.advance(len(batch))
        t0 = time.perf_counter()
        pipe.finish()
        bar.add_time("write", time.perf_counter() - t0)
        errors = [r["error"] for r in records if r["status"] == "error"]
        filtered = sum(r["status"] == "filtered" for r in records)
        report.samples_failed += len(errors)
        if len(errors) == len(records):
            writer.abort()
            report.shards_failed += 1
            return errors
        if not claim.held():
            raise _LostClaim(shard)
        writer.commit({"shard": shard_name(shard), "fingerprint": info["fingerprint"], "attempted": len(records),
                       "written": len(records) - len(errors) - filtered, "failed": len(errors), "filtered": filtered,
                       "seconds": round(time.perf_counter() - t_start, 3), "samples": records})
    report.shards_written += 1
    report.samples_written += len(records) - len(errors) - filtered
    report.samples_filtered += filtered
    store = open_store(job.out)
    if not store.remote:  # cheap on a file system; on an object store, a run's end (or the Ray driver) writes them
        write_dataset_indexes(store, info)
    return errors


def _encode(sample: tuple, image_format: str, classes: list[str]) -> dict[str, bytes]:
    image, prompt, meta, labels = sample
    return encode_sample(image, prompt, meta, labels, image_format=image_format, classes=classes)


def _failed(record: dict, error: str, prompt: str) -> None:
    record["status"], record["error"], record["prompt"] = "error", error, prompt


def write_dataset_indexes(out: "Path | str | Store", info: dict) -> None:
    """sizes.json and the wids index over every whole shard of this dataset (a damaged one, waiting to be
    redone, is left out). Markers are parsed once per version (`_MARKERS`): a run commits many shards."""
    store = open_store(out)

    def whole(s: int) -> dict | None:
        st = _marker(store, s, info["fingerprint"])
        return st if st is not None and shard_problem(store, st) is None else None

    def finished() -> dict[str, tuple[int, int]]:
        with ThreadPoolExecutor(SCAN_THREADS if store.remote else 1) as pool:  # see unfinished_shards
            found = dict(zip(range(info["num_shards"]), pool.map(whole, range(info["num_shards"]))))
        return index_entries({s: st for s, st in found.items() if st is not None})

    write_indexes(store, finished, wids=info["format"] == "webdataset")


_MARKERS: dict[str, tuple[tuple, dict | None]] = {}  # marker URL → (its Stat: size, mtime, version; its stats)


def _marker(store: Store, shard: int, fingerprint: str) -> dict | None:
    """read_stats, parsed again only when the marker file changed."""
    name = stats_name(shard)
    key = store.stat(name)
    if key is None:
        return None
    url = store.url(name)
    cached = _MARKERS.get(url)
    if cached is None or cached[0] != key:
        cached = _MARKERS[url] = (key, read_stats(store, shard))
    stats = cached[1]
    return stats if stats is not None and stats.get("fingerprint") == fingerprint else None


def job_config(job: GenerateJob) -> dict:
    d = asdict(job)
    d["out"] = str(job.out)
    return d

