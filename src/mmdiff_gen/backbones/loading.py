"""Load a frozen diffusers pipeline from a local folder or a hub id (offline is the normal case)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import SettingsError
from .base import Backbone
from .flux import FluxBackbone
from .flux2 import Flux2Backbone
from .qwenimage import QwenImageBackbone
from .sd3 import SD3Backbone
from .wan import WanBackbone

# Optional file beside model_index.json: recommended sampling settings and capture defaults.
SETTINGS_FILE = "mmdiff.json"
ASSETS = Path(__file__).resolve().parent.parent / "assets"

# Pipeline class name (model_index.json "_class_name") → adapter.
_ADAPTERS: dict[str, type[Backbone]] = {
    "FluxPipeline": FluxBackbone,
    "Flux2Pipeline": Flux2Backbone,
    "Flux2KleinPipeline": Flux2Backbone,
    "QwenImagePipeline": QwenImageBackbone,
    "StableDiffusion3Pipeline": SD3Backbone,
    "WanPipeline": WanBackbone,
}


_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class BackboneNotFound(SettingsError):
    """The weights are not on this machine; the message says how to get them."""


def _adapter_for(class_name: str) -> type[Backbone]:
    try:
        return _ADAPTERS[class_name]
    except KeyError:
        raise KeyError(
            f"unsupported pipeline {class_name!r}; supported: {', '.join(sorted(_ADAPTERS))}"
        ) from None


def _pipeline_class(name: str):
    import diffusers

    return getattr(diffusers, name)


PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # weights formats that torch.load would unpickle


class PickledWeights(SettingsError):
    """A weights folder that holds only pickles: never handed to the unpickler."""


def safetensors_only(folder: str | Path, what: str) -> None:
    """Refuse a folder whose weights are pickles only (no .safetensors beside them), naming the file: loaders
    fall back to them through torch.load, and nothing this tool reads is unpickled."""
    folder = Path(folder)
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLES) if folder.is_dir() else []
    if pickles and not any(folder.glob("*.safetensors")):
        raise PickledWeights(f"{what}: {folder / pickles[0]} is a pickle; only safetensors weights are read (convert "
                             "it once on a trusted machine: load it and save_pretrained(..., safe_serialization=True))")


def _read_model_index(model: str) -> tuple[str, dict]:
    """Resolve `model` to a local folder holding model_index.json, from a path or the HF cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise BackboneNotFound(f"{path} is not a diffusers pipeline folder (no model_index.json)")
        return str(path), json.loads(index.read_text())
    if not _REPO_ID.fullmatch(model):
        raise BackboneNotFound(f"no pipeline folder at {path}")
    folder = hub_snapshot(model)
    if folder is None:
        raise BackboneNotFound(
            f"{model!r} is not in the local Hugging Face cache ({hub_cache()}); on a machine with internet run "
            f"`hf download {model}` (accept the model's licence on the Hub first), or pass a local folder"
        )
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        raise BackboneNotFound(f"the cached snapshot of {model!r} has no model_index.json: re-run `hf download {model}`")
    return str(folder), json.loads(index.read_text())


def hub_cache() -> str:
    """The Hugging Face cache folder (HF_HUB_CACHE, else HF_HOME/hub, as huggingface_hub reads them)."""
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def hub_snapshot(repo_id: str, allow_patterns: list[str] | None = None, download: bool = False) -> Path | None:
    """The local snapshot folder of the Hub model repo `repo_id`: from the local HF cache (offline), else, with
    `download` and unless HF_HUB_OFFLINE is set, fetched from the Hub (only files matching `allow_patterns`).
    None when neither works (not cached; Hub unreachable, repo unknown or gated): the caller says how to get it."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HTTPError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=allow_patterns))
    except (OSError, ValueError):  # LocalEntryNotFoundError is a FileNotFoundError; a bad id is a ValueError
        pass
    if not download or constants.HF_HUB_OFFLINE:
        return None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns))
    except (OSError, ValueError, HTTPError):  # unknown or gated repo, Hub down, proxy or transfer failure
        return None


def _tiny_random(build: str, adapter: type[Backbone]):
    def load(dtype: torch.dtype) -> Any:
        """The pipeline in `dtype`, on the CPU (load_backbone places it)."""
        from . import tiny

        pipe = getattr(tiny, build)(seed=0)  # float32 weights
        return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
    load.adapter = adapter  # what `adapter_class` answers before anything is built
    return load


# Short names. "toy" is the embedded default, shipped in the package and loaded like any folder;
# "tiny-random" (FLUX), "tiny-random-sd3" and "tiny-random-wan" (video) have random weights: for smoke tests only.
BUILTIN_FOLDERS = {"toy": ASSETS / "toy", "toy-video": ASSETS / "toy_video"}
BUILTIN = {"tiny-random": _tiny_random("build_tiny_flux", FluxBackbone),
           "tiny-random-sd3": _tiny_random("build_tiny_sd3", SD3Backbone),
           "tiny-random-wan": _tiny_random("build_tiny_wan", WanBackbone)}
# The heads a short name uses when `generate` is given none.
DEFAULT_HEADS = {"toy": ASSETS / "toy_heads", "toy-video": ASSETS / "toy_video_heads"}


_SAMPLES, _SAMPLE_BYTES = 16, 1 << 16  # 1 MiB read per weight file, whatever its size


def config_digest(config, **extra) -> str:
    """A transformers model's architecture as a short hash: its config's public fields (not its dtype or the
    transformers version that wrote it) and `extra` (e.g. DINOv3's normalisation). Heads record and check it."""
    fields = {k: v for k, v in config.to_dict().items()
              if not k.startswith("_") and k not in ("dtype", "torch_dtype", "transformers_version")}
    return hashlib.sha256(json.dumps({**fields, **extra}, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _weights_id(folder: Path, files: str = "transformer/*") -> str:
    """A cheap fingerprint of the weights: the Hub commit of a cached snapshot (content-addressed), else
    the weight files (`files`, a glob in `folder`: a pipeline's transformer, a VLM's `*.safetensors`) — names,
    sizes and 16 blocks of 64 KiB spread over each file (so a retrained or fine-tuned file of the same size is
    caught) — and mmdiff.json. Heads record it."""
    if folder.parent.name == "snapshots":
        return folder.name
    h = hashlib.sha256()
    for f in sorted(p for p in folder.glob(files) if p.is_file()):
        size = f.stat().st_size
        h.update(f"{f.name}:{size};".encode())
        with open(f, "rb") as fh:
            for i in range(_SAMPLES):
                fh.seek(i * max(0, size - _SAMPLE_BYTES) // max(1, _SAMPLES - 1))
                h.update(fh.read(_SAMPLE_BYTES))
    settings = folder / SETTINGS_FILE
    if settings.is_file():
        h.update(settings.read_bytes())
    return "s" + h.hexdigest()[:15]  # "s": sampled content (ids of name-and-size hashes had no prefix)


def load_backbone(
    model: str,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cuda",
    offload: str = "none",
    storage: str = "full",
    lora: Path | str | None = None,
    lora_scale: float = 1.0,
    **pipeline_kwargs: Any,
) -> Backbone:
    """Load a frozen pipeline, store and place it as asked, and wrap it in its family adapter.

    Args:
        model: a short name (see BUILTIN), a local pipeline folder, or a hub id resolved from the
            local HF cache only.
        dtype: the dtype the transformer computes in (and the other components' weights); bf16 on CUDA for
            real use, float32 on CPU.
        device: where the pipeline computes; chosen by the caller, never guessed here.
        offload: none (all on `device`), model (each component moved in for its forward), sequential (every
            layer streamed in: slowest, least memory) or group (diffusers' leaf-level group offload, prefetched
            on a CUDA stream). Needs an accelerator.
        storage: full (the weights in `dtype`), fp8 (transformer weights stored in float8_e4m3fn, each layer
            upcast to `dtype` for its forward) or int8 (torchao int8 weight-only transformer).
        lora: a diffusers LoRA file (.safetensors) or a folder holding pytorch_lora_weights.safetensors (what
            `finetune-grounding` writes), loaded into the transformer before placement as adapter "lora".
        lora_scale: its weight (`set_adapters`); 0 computes exactly what the base model does.
        pipeline_kwargs: passed to `from_pretrained` (e.g. `variant`).

    The backbone's `runtime` records what was applied ({"offload", "storage"}).
    """
    from .runtime import apply_runtime, check_runtime, describe, int8_config

    check_runtime(offload, storage, device=device)
    if storage == "int8" and "quantization_config" in pipeline_kwargs:
        raise ValueError("storage int8 and a quantization_config both quantize the transformer: pass one")
    if model in BUILTIN:
        pipe = BUILTIN[model](dtype)
        name, settings, weights_id = model, {}, ""
    else:
        folder, index = _pipeline_folder(model)
        cls = _pipeline_class(index["_class_name"])
        if storage == "int8":  # quantized while it loads (diffusers' TorchAoConfig): full weights never held
            from diffusers import TorchAoConfig
            from diffusers.quantizers import PipelineQuantizationConfig

            pipeline_kwargs["quantization_config"] = PipelineQuantizationConfig(
                quant_mapping={"transformer": TorchAoConfig(int8_config())})
        for sub in sorted(Path(folder).iterdir()):
            safetensors_only(sub, f"{model} ({sub.name})")
        try:
            pipe = cls.from_pretrained(folder, dtype=dtype, local_files_only=True, use_safetensors=True,
                                       **pipeline_kwargs)
        except OSError as err:
            raise BackboneNotFound(f"could not load {model!r} from {folder}: {str(err).splitlines()[0]}") from None
        name, weights_id, settings = model, _weights_id(Path(folder)), _settings(Path(folder))
    if lora is not None:
        load_lora(pipe, lora, lora_scale)
    apply_runtime(pipe, offload=offload, storage=storage, dtype=dtype, device=device)
    pipe.set_progress_bar_config(disable=True)
    bb = _adapter_for(type(pipe).__name__)(pipe, name=name, settings=settings, weights_id=weights_id)
    bb.runtime = describe(pipe)
    return bb


def _pipeline_folder(model: str) -> tuple[str, dict]:
    """(folder, model_index.json) of a pipeline named by a built-in folder name, a path or a hub id; an unsupported
    pipeline fails here, before anything loads."""
    source = model
    if model in BUILTIN_FOLDERS:
        source = str(BUILTIN_FOLDERS[model])
        if not (BUILTIN_FOLDERS[model] / "model_index.json").is_file():
            raise BackboneNotFound(f"the embedded {model!r} backbone is not in this install ({source}); "
                                   f"train it with `mmdiff-gen toy {'train' if model == 'toy' else 'train-video'}`")
    folder, index = _read_model_index(source)
    _adapter_for(index.get("_class_name", "?"))
    return folder, index


def adapter_class(model: str) -> type[Backbone]:
    """The family adapter `load_backbone(model)` will use, read from the pipeline's model_index.json (nothing
    loads): lets settings a family cannot run be refused before minutes of loading."""
    if model in BUILTIN:
        return BUILTIN[model].adapter
    return _adapter_for(_pipeline_folder(model)[1].get("_class_name", "?"))


def _settings(folder: Path) -> dict:
    """The folder's mmdiff.json (recommended sampling, capture layers), else {}."""
    path = folder / SETTINGS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def meta_backbone(model: str) -> Backbone:
    """The backbone `model` names (as `load_backbone` takes it), its transformer built on the meta device from its
    config files, no weights read: geometry, identity and FLOP counts in seconds, whatever its size, before a run
    loads it (`train --recipe`'s cost plan needs only the snapshot's JSON files). The in-memory short names
    (tiny-random) are built whole: they are tiny. Without a loaded tokenizer the text length is mmdiff.json's, else the
    family's cap (FLUX 512, SD3 256 T5 tokens)."""
    from .flops import config_backbone

    if model in BUILTIN:
        return load_backbone(model, dtype=torch.float32, device="cpu")
    folder, index = _pipeline_folder(model)
    try:
        config = json.loads((Path(folder) / "transformer" / "config.json").read_text())
        vae = json.loads((Path(folder) / "vae" / "config.json").read_text())
    except FileNotFoundError as e:
        raise BackboneNotFound(f"{model!r} has no {Path(e.filename).parent.name}/config.json in {folder}") from None
    adapter = _adapter_for(index["_class_name"])
    return config_backbone(adapter, index["transformer"][1], config, vae_scale_factor=adapter.vae_scale_factor(vae),
                           name=model, settings=_settings(Path(folder)), weights_id=_weights_id(Path(folder)))


LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' default LoRA file name


def load_lora(pipe: Any, path: Path | str, scale: float = 1.0, name: str = "lora") -> None:
    """A diffusers LoRA file into the pipeline's transformer as adapter `name` at `scale`. Only safetensors
    files are read (a `.bin` / `.pth` LoRA is a pickle: refused); ValueError names what is wrong."""
    file = lora_file(path)
    try:
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name)
    except ImportError:
        raise ImportError("loading a LoRA needs peft: pip install 'mmdiff-gen[lora]'") from None
    except (ValueError, KeyError, RuntimeError, OSError) as e:  # diffusers / peft / safetensors, in their words
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"--lora {file}: not a LoRA this transformer can load ({first})") from None
    pipe.set_adapters([name], adapter_weights=[float(scale)])


def lora_file(path: Path | str) -> Path:
    """The .safetensors file a --lora names (a file, or a folder holding pytorch_lora_weights.safetensors); a
    SettingsError when there is none or it is another format (a pickle): checked before anything loads."""
    path = Path(path)
    file = path / LORA_WEIGHTS if path.is_dir() else path
    if not file.is_file():
        raise SettingsError(f"--lora {path}: no LoRA file there" + (f" (expected {LORA_WEIGHTS})" if path.is_dir() else ""))
    if file.suffix != ".safetensors":
        raise SettingsError(f"--lora {file}: LoRA files are read as .safetensors only (other formats are pickles)")
    return file


def wrap_pipeline(pipe: Any, name: str = "custom", settings: dict | None = None, weights_id: str = "") -> Backbone:
    """Wrap an already-built pipeline (tests, notebooks) in its family adapter; its `runtime` says how the
    transformer is held (offload, fp8 / quantized storage), as read from the pipeline."""
    from .runtime import describe

    bb = _adapter_for(type(pipe).__name__)(pipe, name=name, settings=settings, weights_id=weights_id)
    bb.runtime = describe(pipe)
    return bb
