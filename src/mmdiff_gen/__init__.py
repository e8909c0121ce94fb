"""mmdiff-gen: one diffusion-transformer pass yields an image and its dense annotations (MMDiff)."""

__version__ = "0.1.0"


# The dataset job's public entry, imported on first use (the CLI's `--help` must not load torch).
_LAZY = {"GenerateConfig": "jobs.generator", "DatasetGenerator": "jobs.generator", "generate_dataset": "jobs.generator",
         "GenerateJob": "jobs.dataset_job", "JobReport": "jobs.dataset_job"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
