"""The dataset job: one generation pass per batch of prompts → images with their label maps, in shards.

Flow per shard this worker owns: plan (jobs.plan) → generate + capture (capture.generate) → heads
(jobs.annotate) → encode (io.members) → ShardWriter (io.shards), whose stats file is written last. A
finished shard is never touched again; re-running the same command redoes only the others.
"""

from __future__ import annotations

import hashlib
import json
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..backbones.base import Backbone
from ..capture import generate
from ..io.dataset import DATASET_FILE
from ..io.members import DEPTH_SCALE, IGNORE_INDEX, TASK_MEMBER, encode_depth, encode_gray, encode_image, encode_json
from ..io.shards import ShardWriter, read_stats, shard_name, write_json_atomic
from ._progress import JobProgress
from .annotate import Annotator
from .plan import SEED_POLICY, PlannedSample, owned_shards, plan_samples, shard_ranges

FORMAT_VERSION = 1
MAX_FAILED_SHARDS = 3  # consecutive shards in which every sample failed: stop the job


class Interrupted(BaseException):
    """SIGINT / SIGTERM / SIGUSR1 reached the job; the open shard was discarded.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way can swallow it.
    """

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class FingerprintMismatch(ValueError):
    """The output folder holds a dataset made from other inputs."""


@dataclass(frozen=True)
class GenerateJob:
    """Everything that defines a dataset run besides the backbone and the heads.

    Args:
        out: output folder.
        tasks: subset of "seg", "saliency", "depth", "openseg" (zero-shot, from the grounding attention).
        images_per_prompt: samples per prompt (repeat r of prompt p has seed sample_seed(seed, p, r)).
        seed: global seed.
        batch_size: prompts per generation pass (does not change which samples exist or their seeds).
        height, width, num_inference_steps, guidance_scale, true_cfg_scale, negative_prompt,
            max_sequence_length: sampling settings, as in FluxPipeline.
        image_format: "jpg" (quality 95, 4:4:4) or "png".
        format: "webdataset" (NNNNN.tar shards) or "files" (images/, seg/, saliency/, depth/, meta/).
        shard_size: samples per shard.
        store_dtype: dtype of the captured features (bfloat16 keeps FLUX's large activations).
        min_quality: samples whose quality score is below it are not written (status "filtered").
        overwrite: replace a dataset made from other inputs instead of refusing.
        retry_failed: also redo finished shards that recorded failed samples.
    """

    out: Path
    tasks: tuple[str, ...]
    images_per_prompt: int = 1
    seed: int = 0
    batch_size: int = 4
    height: int = 512
    width: int = 512
    num_inference_steps: int = 28
    guidance_scale: float = 3.5
    true_cfg_scale: float = 1.0
    negative_prompt: str | None = None
    max_sequence_length: int = 512
    image_format: str = "jpg"
    format: str = "webdataset"
    shard_size: int = 1000
    store_dtype: str = "bfloat16"
    min_quality: float | None = None
    overwrite: bool = False
    retry_failed: bool = False

    def __post_init__(self):
        object.__setattr__(self, "out", Path(self.out))
        bad = [t for t in self.tasks if t not in TASK_MEMBER]
        if bad or not self.tasks:
            raise ValueError(f"unknown tasks {bad}; choose from seg, saliency, depth, openseg")
        for name in ("images_per_prompt", "batch_size", "shard_size", "num_inference_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.image_format not in ("jpg", "png"):
            raise ValueError(f"image format must be jpg or png, got {self.image_format!r}")
        if self.format not in ("webdataset", "files"):
            raise ValueError(f"format must be webdataset or files, got {self.format!r}")

    def sampling(self) -> dict:
        """The settings that change the pixels (part of the fingerprint)."""
        keys = ("images_per_prompt", "seed", "height", "width", "num_inference_steps", "guidance_scale",
                "true_cfg_scale", "negative_prompt", "max_sequence_length", "store_dtype")
        return {k: getattr(self, k) for k in keys}


@dataclass
class JobReport:
    """What one worker did in one run."""

    rank: int
    world_size: int
    shards_owned: int
    shards_skipped: int = 0
    shards_written: int = 0
    samples_written: int = 0
    samples_failed: int = 0
    samples_filtered: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


def overlong_prompts(backbone: Backbone, prompts: list[str], max_len: int) -> list[tuple[int, int]]:
    """(prompt index, token count) of prompts the T5 tokenizer will truncate at `max_len`."""
    tok = getattr(backbone.pipe, "tokenizer_2", None)
    if tok is None:
        return []
    ids = tok(prompts, truncation=False, add_special_tokens=True).input_ids
    return [(i, len(x)) for i, x in enumerate(ids) if len(x) > max_len]


def dataset_info(job: GenerateJob, prompts: list[str], backbone: Backbone, annotator: Annotator, dtype: str) -> dict:
    """dataset.json: the effective config, the input fingerprint and what a reader needs to decode labels."""
    heads = annotator.identity()
    inputs = {"prompts": prompts, "tasks": list(job.tasks), "sampling": job.sampling(), "dtype": dtype,
              "backbone": backbone.identity(), "heads": {t: h["sha256"] for t, h in heads.items()},
              "openseg": heads.get("openseg"), "min_quality": job.min_quality,
              "shard_size": job.shard_size, "format": job.format, "image_format": job.image_format}
    fingerprint = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    n = len(prompts) * job.images_per_prompt
    members = [job.image_format, "txt", "json"] + [TASK_MEMBER[t] for t in job.tasks]
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
        "heads": heads,
        "classes": annotator.classes,
        "palette": annotator.palette,
        "ignore_index": IGNORE_INDEX,
        "config": job_config(job),
        "depth": {"unit": annotator.depth_unit or "relative", "scale": DEPTH_SCALE, "invalid": 0,
                  "encoding": "uint16 PNG, value = depth × scale"},
        "saliency": {"encoding": "uint8 PNG, 0–255"},
        "segmentation": {"encoding": "uint8 PNG of class ids, 255 = ignore"},
        "openseg": annotator.openseg.to_dict() | {"encoding": "uint8 PNG of ids into openseg.classes, 0 = background"}
        if annotator.openseg else None,
        "quality": {"field": "json member's quality.score (mean of the signals beside it)",
                    "min_quality": job.min_quality},
    }


def prepare_output(job: GenerateJob, info: dict) -> None:
    """Create the folder and dataset.json, or check that an existing one was made from the same inputs."""
    out = job.out
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise NotADirectoryError(f"cannot create output folder {out}: a file is in the way") from None
    path = out / DATASET_FILE
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old.get("fingerprint") == info["fingerprint"]:
            return
        if not job.overwrite:
            raise FingerprintMismatch(
                f"{out} holds a dataset made from other inputs (prompts, settings, backbone or heads); "
                "use another --out, or --overwrite to replace it")
    write_json_atomic(path, info)


def _remove_foreign_shards(out: Path, fingerprint: str, keep: set[int]) -> None:
    """Delete finished shards made from other inputs (left by --overwrite), except those in `keep`, which
    their workers redo anyway. Readers already ignore them; this frees the space."""
    for marker in out.glob("[0-9]*_stats.json"):
        shard = int(marker.name.split("_")[0])
        st = read_stats(out, shard)
        if shard in keep or st is None or st.get("fingerprint") == fingerprint:
            continue
        marker.unlink(missing_ok=True)
        (out / f"{shard_name(shard)}.tar").unlink(missing_ok=True)
        for rec in st.get("samples", []):  # files layout
            for folder in ("images", "meta", "prompts", "seg", "saliency", "depth", "openseg"):
                for f in (out / folder).glob(f"{rec['key']}.*"):
                    f.unlink(missing_ok=True)


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


def _members(job: GenerateJob, s: PlannedSample, image: np.ndarray, labels: dict[str, np.ndarray],
             sigmas: list[float], quality: dict, classes: list[str]) -> dict[str, bytes]:
    meta = {"key": s.key, "prompt_index": s.prompt_index, "repeat": s.repeat, "seed": s.seed, "sigmas": sigmas,
            "quality": quality}
    out = {job.image_format: encode_image(image, job.image_format), "txt": s.prompt.encode("utf-8")}
    if "seg" in labels:
        ids = labels["seg"]
        meta["classes"] = [classes[i] if i < len(classes) else str(i) for i in np.unique(ids) if i != IGNORE_INDEX]
        out["seg.png"] = encode_gray(ids)
    if "saliency" in labels:
        out["sal.png"] = encode_gray(labels["saliency"])
    if "depth" in labels:
        out["depth.png"] = encode_depth(labels["depth"], DEPTH_SCALE)
    if "openseg" in labels:
        out["openseg.png"] = encode_gray(labels["openseg"])
    out["json"] = encode_json(meta)
    return out


class _Runner:
    """Generates and annotates batches; isolates a failing sample by retrying its batch one by one."""

    def __init__(self, backbone: Backbone, annotator: Annotator, job: GenerateJob, progress: JobProgress):
        self.bb, self.ann, self.job, self.progress = backbone, annotator, job, progress
        self.spec = annotator.spec(store_dtype=job.store_dtype)

    def batch(self, samples: list[PlannedSample]) -> list[tuple[np.ndarray, dict, list[float], dict] | str]:
        try:
            return self._batch(samples)
        except OSError:  # disk trouble is the job's, not the sample's
            raise
        except Exception as e:  # noqa: BLE001 — recorded per sample, the run goes on
            if len(samples) == 1:
                return [f"{type(e).__name__}: {e}"]
            return [r for s in samples for r in self.batch([s])]

    def _batch(self, samples):
        j = self.job
        t0 = time.perf_counter()
        gen = generate(self.bb, [s.prompt for s in samples], self.spec, seeds=[s.seed for s in samples],
                       height=j.height, width=j.width, num_inference_steps=j.num_inference_steps,
                       guidance_scale=j.guidance_scale, true_cfg_scale=j.true_cfg_scale,
                       negative_prompt=j.negative_prompt if j.true_cfg_scale > 1 else None,
                       max_sequence_length=j.max_sequence_length)
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
            results.append((np.asarray(image.convert("RGB")), {t: v[i].numpy() for t, v in ann.labels.items()},
                            [float(x) for x in cap.sigmas[i]], ann.quality[i]))
        return results


def run_generate(backbone: Backbone, annotator: Annotator, prompts: list[str], job: GenerateJob, *,
                 rank: int = 0, world_size: int = 1, dtype: str = "float32", progress: bool = True) -> JobReport:
    """Produce (or finish) this worker's shards of the dataset. Re-running it resumes."""
    missing = [t for t in job.tasks if t not in annotator.tasks]
    if missing:
        raise ValueError(f"the heads have no {', '.join(missing)} head")
    _check_settings(backbone, annotator, job)
    info = dataset_info(job, prompts, backbone, annotator, dtype)
    prepare_output(job, info)
    plan = plan_samples(prompts, job.images_per_prompt, job.seed)
    ranges = shard_ranges(len(plan), job.shard_size)
    mine = owned_shards(len(ranges), rank, world_size)
    for stale in job.out.glob(".*.tmp"):  # temporaries of killed runs (only this worker's shards)
        head = stale.name[1:].split(".")[0].split("_")[0]
        if head.isdigit() and int(head) in mine:
            stale.unlink(missing_ok=True)
    if rank == 0:  # shards past the end of a replaced dataset: nobody will redo them
        _remove_foreign_shards(job.out, info["fingerprint"], keep=set(range(len(ranges))))
    report = JobReport(rank=rank, world_size=world_size, shards_owned=len(mine))
    todo = []
    for s in mine:
        st = read_stats(job.out, s, info["fingerprint"])
        if st is not None and not (job.retry_failed and st["failed"]):
            report.shards_skipped += 1
        else:
            todo.append(s)
    bar = JobProgress(sum(len(ranges[s]) for s in todo), f"worker {rank}/{world_size}" if world_size > 1 else "generate",
                      enabled=progress)
    failed_in_a_row = 0
    try:
        runner = _Runner(backbone, annotator, job, bar)
        with _signals_raise():
            for s in todo:
                failed, attempted = _write_shard(s, [plan[i] for i in ranges[s]], runner, job, info, report, bar)
                failed_in_a_row = failed_in_a_row + 1 if failed == attempted else 0
                if failed_in_a_row == MAX_FAILED_SHARDS:  # not bad luck: something is broken; stop burning GPU time
                    first = read_stats(job.out, s)["samples"][0]["error"]
                    raise RuntimeError(f"every sample of the last {MAX_FAILED_SHARDS} shards failed; first error: {first}")
    finally:
        bar.close()
        report.seconds = dict(bar.stages)
        try:
            _write_sizes(job.out, info["num_shards"], info["fingerprint"])
        except OSError:
            pass  # best effort: never hide the error that brought us here
    return report


def _check_settings(backbone: Backbone, annotator: Annotator, job: GenerateJob) -> None:
    """Settings errors surface here, once, not as every sample failing in turn."""
    backbone.pipeline_kwargs({"true_cfg_scale": job.true_cfg_scale})  # SD3 refuses true CFG
    spec = annotator.spec(store_dtype=job.store_dtype)
    for name, layers, blocks in (("capture", spec.layers, backbone.feature_blocks),
                                 ("openseg", spec.text_attention_layers, backbone.attention_blocks)):
        if layers and max(layers) >= len(blocks):
            raise ValueError(f"{name} layer {max(layers)} out of range: the backbone has {len(blocks)} such blocks")
    if job.min_quality is not None and not {"seg", "saliency", "openseg"} & set(annotator.tasks):
        raise ValueError("min_quality needs a task with a quality signal: seg, saliency or openseg")


def _write_shard(shard: int, samples: list[PlannedSample], runner: _Runner, job: GenerateJob, info: dict,
                 report: JobReport, bar: JobProgress) -> tuple[int, int]:
    """Generate, annotate and write one shard; returns (failed, attempted) samples."""
    t_start = time.perf_counter()
    records = []
    with ShardWriter(job.out, shard, job.format) as writer:
        for b in range(0, len(samples), job.batch_size):
            batch = samples[b : b + job.batch_size]
            results = runner.batch(batch)
            t0 = time.perf_counter()
            for s, r in zip(batch, results):
                if isinstance(r, str):
                    records.append({"key": s.key, "prompt_index": s.prompt_index, "repeat": s.repeat,
                                    "status": "error", "error": r})
                    continue
                image, labels, sigmas, quality = r
                record = {"key": s.key, "prompt_index": s.prompt_index, "repeat": s.repeat,
                          "quality": quality.get("score")}
                if job.min_quality is not None and (quality.get("score") or 0.0) < job.min_quality:
                    records.append({**record, "status": "filtered"})  # deterministic: a re-run would drop it again
                    continue
                writer.write(s.key, _members(job, s, image, labels, sigmas, quality, info["classes"]))
                records.append({**record, "status": "ok"})
            bar.add_time("write", time.perf_counter() - t0)
            bar.advance(len(batch))
        failed = [r for r in records if r["status"] == "error"]
        filtered = sum(r["status"] == "filtered" for r in records)
        writer.commit({"shard": shard_name(shard), "fingerprint": info["fingerprint"], "attempted": len(records),
                       "written": len(records) - len(failed) - filtered, "failed": len(failed), "filtered": filtered,
                       "seconds": round(time.perf_counter() - t_start, 3), "samples": records})
    report.shards_written += 1
    report.samples_written += len(records) - len(failed) - filtered
    report.samples_failed += len(failed)
    report.samples_filtered += filtered
    return len(failed), len(records)


def _write_sizes(out: Path, num_shards: int, fingerprint: str) -> None:
    """sizes.json ({shard file: samples}) over every finished shard, as open_clip-style loaders read it."""
    sizes = {f"{shard_name(s)}.tar": st["written"] for s in range(num_shards)
             if (st := read_stats(out, s, fingerprint))}
    write_json_atomic(out / "sizes.json", sizes)


def job_config(job: GenerateJob) -> dict:
    d = asdict(job)
    d["out"] = str(job.out)
    return d
