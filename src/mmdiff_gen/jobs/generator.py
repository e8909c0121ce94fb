"""The dataset job assembled once: every `generate` setting in one config, one call that runs it.

`GenerateConfig` holds what to load (backbone, heads, DINOv3, LoRA, how weights are held and compiled), the dataset
(`GenerateJob`: prompts' samples, sampling, format, output location) and how to run it (one local worker of N, or
Ray). `generate_dataset(config)` is the one entry: the CLI parses into a config and calls it; a Ray worker builds a
`DatasetGenerator` from the same config and writes the shards it is handed.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..tasks import get as get_task
from ..tasks import quality_tasks
from .dataset_job import GenerateJob, JobReport, SettingsError, ShardProducer, run_shards

ENGINES = ("local", "ray")
COMPILE_MODES = ("off", "blocks", "transformer")


@dataclass(frozen=True)
class GenerateConfig:
    """Every setting of a `generate` run.

    Args:
        prompts: the prompts, in order (sample keys follow it).
        job: the dataset: tasks, samples per prompt, seed, sampling, format, shard size, output folder or URL.
        model: short name, local pipeline folder or hub id (local HF cache).
        heads: heads folder, head file or Hub repo id; None: the model's shipped heads.
        classes: openseg's class names, background first; None: the seg head's.
        openseg_layer, openseg_sigma, openseg_threshold: openseg's block, sigma and background threshold
            (None: mmdiff.json's, else the family's defaults).
        dino: a local DINOv3 folder whose features join the heads' inputs (heads trained with it).
        lora, lora_scale: a diffusers LoRA loaded into the transformer, at this weight.
        compile: "off", "blocks" or "transformer" (torch.compile with capture inside).
        precision: the heads' arithmetic: "auto", "bf16" or "fp32".
        device: "auto" (this worker's GPU if any, else cpu) or a torch device.
        dtype: "auto" (bfloat16 on accelerators, float32 on the CPU) or a dtype name.
        offload, storage: backbones.runtime's modes (diffusers' offload; fp8 / int8 weight storage).
        engine: "local" (this process is worker `rank` of `world_size`) or "ray" (jobs.ray_engine schedules
            shards onto Ray workers that each load the model once).
        rank, world_size: the local worker's identity; None: from the environment (torchrun, SLURM, …).
        ray_address: the Ray cluster to join; None: the running one, else a local one.
        workers: Ray workers to start (one GPU each, or CPU workers with device cpu); None: what the cluster
            holds now. More than fit wait for nodes to join (an autoscaler adds them).
    """

    prompts: tuple[str, ...]
    job: GenerateJob
    model: str = "toy"
    heads: str | None = None
    classes: tuple[str, ...] | None = None
    openseg_layer: int | None = None
    openseg_sigma: float | None = None
    openseg_threshold: float | None = None
    dino: str | None = None
    lora: str | None = None
    lora_scale: float = 1.0
    compile: str = "off"
    precision: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    offload: str = "none"
    storage: str = "full"
    engine: str = "local"
    rank: int | None = None
    world_size: int | None = None
    ray_address: str | None = None
    workers: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "prompts", tuple(self.prompts))
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(self.classes))
        for name in ("heads", "dino", "lora"):  # paths travel as strings (a Ray worker may see another cwd)
            v = getattr(self, name)
            if isinstance(v, Path):
                object.__setattr__(self, name, str(v))
        if not self.prompts:
            raise SettingsError("no prompts")
        if self.engine not in ENGINES:
            raise SettingsError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.compile not in COMPILE_MODES:
            raise SettingsError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {self.compile!r}")
        if self.workers is not None and self.workers < 1:
            raise SettingsError(f"workers must be ≥ 1, got {self.workers}")
        if not math.isfinite(self.lora_scale):
            raise SettingsError(f"lora_scale must be a finite number, got {self.lora_scale}")
        if self.engine == "ray" and (self.rank is not None or self.world_size not in (None, 1)):
            raise SettingsError("the Ray engine schedules every shard itself: no rank / world size")

    def check(self) -> tuple[dict[str, Path], list[str] | None]:
        """Everything that can be checked before a backbone loads (minutes for FLUX): head files, openseg's
        classes, quality filtering, runtime modes against the device. Returns (head file per task, openseg
        classes) for `build_annotator`. Raises SettingsError, ValueError or FileNotFoundError."""
        from ..backbones.runtime import check_compilable, check_runtime
        from .annotate import plan_annotator

        import torch

        from ..backbones.loading import adapter_class, lora_file
        from ..backbones.runtime import torch_dtype
        from ..heads.checkpoint import read_meta

        check_location(self.job.out)
        if self.lora is not None:
            lora_file(self.lora)
        if self.compile != "off":
            check_compilable(self.offload)
        # The devices are the workers': a Ray driver (a KubeRay head) often has no GPU, so each worker checks its own.
        device = self.resolved_device() if self.engine == "local" else None
        if device is not None:
            check_runtime(self.offload, self.storage, device=device)
        adapter = adapter_class(self.model)
        fp16 = torch_dtype(self.dtype, device or "cuda") == torch.float16
        if fp16 and not adapter.FLOAT16_OK:
            raise SettingsError(f"--dtype float16: {adapter.family.upper()} overflows float16 (its activations saturate "
                                "the features); use bfloat16 or float32")
        if self.job.min_quality is not None and not any(get_task(t).confidence for t in self.job.tasks):
            raise SettingsError(f"--min-quality needs a task with a quality signal: {', '.join(quality_tasks())}")
        files, names = plan_annotator(self.model, list(self.job.tasks), self.heads,
                                      list(self.classes) if self.classes else None)
        if self.dino is not None and not any(read_meta(f).dino for f in files.values()):
            raise SettingsError("--dino: none of these heads was trained with DINOv3 features, so it would change "
                                "nothing; drop it (or use heads trained with --dino)")
        return files, names

    def resolved_device(self) -> str:
        """`device` for this process: auto → cuda if visible, else cpu; `cuda` → this worker's GPU."""
        from ..backbones.runtime import resolve_device
        from .plan import local_device

        return local_device(resolve_device(self.device))


def check_location(out: str | Path) -> None:
    """SettingsError unless `out` is, or can be made, a writable folder, or names a bucket these credentials
    reach; creates nothing."""
    from ..io.store import LocalStore, open_store

    store = open_store(out)
    if not isinstance(store, LocalStore):
        try:
            store.prepare()  # an object store: the bucket exists and answers (creates nothing there)
        except (OSError, ValueError) as e:
            raise SettingsError(str(e).splitlines()[0]) from None
        return
    folder = store.root.absolute()
    if folder.exists() and not folder.is_dir():
        raise SettingsError(f"--out {folder} is a file, not a folder")
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise SettingsError(f"cannot create output folder {folder}: {existing} is not a writable folder")


class DatasetGenerator:
    """Loads the backbone, DINOv3, the LoRA and the heads once, then writes the shards it is asked for.

    `run(rank, world_size)` is one worker of a local job (resume, claims, indexes); `write_shard(s)` writes one
    shard (a Ray worker's unit of work). The output location is prepared (dataset.json written or checked) by
    `prepare()`, which `run` calls.
    """

    def __init__(self, config: GenerateConfig):
        import torch

        from ..backbones import load_backbone
        from ..backbones.runtime import torch_dtype
        from .annotate import build_annotator

        files, names = config.check()
        self.config = config
        self.device = config.resolved_device()
        if self.device.startswith("cuda:"):
            torch.cuda.set_device(self.device)  # streams and events (group offload) go to the current device
        dt = torch_dtype(config.dtype, self.device)
        self.backbone = bb = load_backbone(config.model, dtype=dt, device=self.device, offload=config.offload,
                                           storage=config.storage, lora=config.lora, lora_scale=config.lora_scale)
        if config.compile != "off":
            from ..capture import compile_backbone

            compile_backbone(bb, config.compile)
        dino = None
        if config.dino is not None:
            from ..backbones.dino import DinoFeatures

            dino = DinoFeatures.load(config.dino, device=self.device, dtype=dt)
        grounding = {"layer": config.openseg_layer, "sigma": config.openseg_sigma,
                     "threshold": config.openseg_threshold}
        self.annotator = build_annotator(bb, files, names, grounding, dino=dino, device=self.device,
                                         precision=config.precision)
        self.producer = ShardProducer(bb, self.annotator, list(config.prompts), config.job,
                                      dtype=str(dt).removeprefix("torch."))
        self.job = self.producer.job  # resolved: the backbone's sampling settings filled in

    def overlong_prompts(self) -> list[tuple[int, int]]:
        """(prompt index, text tokens) of the prompts the text encoder will truncate."""
        return self.backbone.overlong_prompts(list(self.config.prompts), self.job.max_sequence_length)

    def prepare(self, rank: int = 0) -> dict:
        """Write (or check) dataset.json at the output location; returns it."""
        self.producer.prepare(rank)
        return self.producer.info

    def run(self, rank: int = 0, world_size: int = 1, progress: bool = True) -> JobReport:
        """This worker's shards of the dataset, then the ones nobody claimed; a re-run resumes."""
        return run_shards(self.producer, rank=rank, world_size=world_size, progress=progress)

    def write_shard(self, shard: int, token: str | None = None) -> JobReport:
        """Write one shard if it is not finished (claimed under `token`); what happened, as a one-shard report."""
        from ._progress import JobProgress

        report = JobReport(rank=0, world_size=1, shards_owned=1)
        bar = JobProgress(len(self.producer.ranges[shard]), enabled=False)
        if not self.producer.finished(shard, report):
            self.producer.write(shard, report, bar, token=token)
        report.seconds = dict(bar.stages)
        return report


def generate_dataset(config: GenerateConfig, progress: bool = True,
                     say: Callable[[str], None] | None = None) -> JobReport:
    """Run a `generate` job: load once, write every shard this process (or the Ray cluster) is to write.

    Args:
        config: every setting (checked before anything loads).
        progress: show a progress bar (a line every 30 s when stderr is not a terminal).
        say: receives one-line notices (truncated prompts, the worker's identity); None: dropped.

    Returns the job's report (for Ray: every worker's, summed).
    """
    say = say or (lambda _: None)
    if config.engine == "ray":
        from .ray_engine import run_ray

        config.check()
        return run_ray(config, progress=progress, say=say)
    from .plan import worker_identity

    try:
        rank, world, source = worker_identity(config.rank, config.world_size)
    except ValueError as e:
        raise SettingsError(str(e)) from None
    from ..io.store import open_store

    if world > 1 and not open_store(config.job.out).atomic_create:
        raise SettingsError(f"{config.job.out}: this store cannot create a file atomically, so {world} processes "
                            "cannot share it safely; run one process, or --engine ray")
    gen = DatasetGenerator(config)
    _say_overlong(gen, say)
    if world > 1:
        say(f"worker {rank} of {world} ({source}) on {gen.device}")
    return gen.run(rank, world, progress=progress)


def _say_overlong(gen: DatasetGenerator, say: Callable[[str], None]) -> None:
    long = gen.overlong_prompts()
    if long:
        i, n = long[0]
        say(f"warning: {len(long)} prompt(s) exceed {gen.job.max_sequence_length} text tokens and will be truncated "
            f"(first: prompt {i + 1}, {n} tokens)")

