"""A heads folder as a Hub model repo: config.json and a README.md model card, generated from what its head files
record (`read_meta`), so the folder uploads as it is and `--heads org/name` finds it again."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .. import __version__
from .._atomic import atomic_path
from ..tasks import TASKS
from .checkpoint import HeadMeta, head_paths, read_meta

CARD_FORMAT = 1
LIBRARY = "mmdiff-gen"
# What a heads repo is downloaded as: weights in safetensors and the two JSON / text files, never a pickle.
REPO_FILES = ["*.safetensors", "config.json", "README.md"]
NOT_RECORDED = "not recorded"


def heads_config(folder: Path, license: str | None = None) -> dict:
    """config.json of a heads folder: the backbone its heads share, the capture they need together, and per head
    file its tasks, classes, capture, training and evaluation as recorded. `license` None keeps the folder's
    recorded licence, else "other" (the backbone's terms). ValueError: no heads, or heads of several backbones."""
    folder = Path(folder)
    if license is not None and not re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", license):
        raise ValueError(f"a licence is a Hub licence id such as apache-2.0, mit or other, got {license!r}")
    metas = {p.name: read_meta(p) for p in head_paths(folder)}
    if not metas:
        raise ValueError(f"{folder} holds no head files (*.safetensors)")
    backbones = {json.dumps(m.backbone, sort_keys=True) for m in metas.values()}
    if len(backbones) > 1:
        names = sorted({f"{m.backbone.get('name')} ({m.backbone.get('config_sha256')})" for m in metas.values()})
        raise ValueError(f"{folder} holds heads of several backbones ({', '.join(names)}): a heads repo serves one")
    backbone = next(iter(metas.values())).backbone
    recorded = _own(folder / "config.json")
    concepts: list[str] = []
    for m in metas.values():
        concepts += [w for w in m.concepts if w not in concepts]
    return {
        "library_name": LIBRARY,
        "format_version": CARD_FORMAT,
        "mmdiff_gen_version": __version__,
        "license": license or recorded.get("license") or "other",
        "backbone": backbone,
        "base_model": _hub_id(backbone),
        # what one generation pass captures for all of them (as the annotator takes the union)
        "capture": {"blocks": sorted({m.blocks for m in metas.values()}),
                    "layers": sorted({i for m in metas.values() for i in m.layers}),
                    "sigmas": sorted({s for m in metas.values() for s in m.sigmas}, reverse=True),
                    "concepts": concepts},
        "heads": {name: _head(m) for name, m in metas.items()},
    }


def write_card(folder: Path, license: str | None = None) -> list[Path]:
    """Write (or refresh) FOLDER/config.json and FOLDER/README.md from its head files, each written then renamed;
    returns their paths. A README.md or config.json that is not mmdiff-gen's is never overwritten (ValueError)."""
    folder = Path(folder)
    config = heads_config(folder, license)
    readme = folder / "README.md"
    _own(readme)
    paths = [folder / "config.json", readme]
    for path, text in zip(paths, (json.dumps(config, indent=1, ensure_ascii=False) + "\n", card_text(config))):
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return paths


def _own(path: Path) -> dict:
    """The metadata of an mmdiff-gen config.json / model card at `path` ({} if absent); ValueError if it is
    someone else's (a project README beside a head file must survive `train`)."""
    if not path.is_file():
        return {}
    if path.suffix == ".json":
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            meta = None
    else:
        from huggingface_hub import metadata_load

        try:
            meta = metadata_load(path)
        except Exception:  # front matter that is not YAML: not a card we wrote
            meta = None
    if not isinstance(meta, dict) or meta.get("library_name") != LIBRARY:
        raise ValueError(f"{path} is not an mmdiff-gen heads {'config' if path.suffix == '.json' else 'model card'}: "
                         f"move it away, then run `mmdiff-gen heads card {path.parent}`")
    return meta


def _hub_id(backbone: dict) -> str | None:
    """The backbone's Hub id when it was loaded from the HF cache: its name is a repo id and its weights
    fingerprint is the snapshot's commit (backbones.loading); None for local folders and short names."""
    name, weights = backbone.get("name") or "", backbone.get("weights") or ""
    return name if re.fullmatch(r"[0-9a-f]{40}", weights) and re.fullmatch(r"[\w.-]+/[\w.-]+", name) else None


def _head(m: HeadMeta) -> dict:
    """One head file's entry: what it predicts, reads, was trained on and scored (absent keys: not recorded)."""
    train = dict(m.metrics.get("train", {}))
    scores = {k: v for k, v in m.metrics.items() if k != "train"}
    tasks = list(m.config.tasks)
    # files of one-channel heads from before multi-task heads hold [task] as their classes: not class names
    classes = [] if m.classes == tasks else list(m.classes)
    return {
        "tasks": tasks,
        "classes": classes,
        "palette": m.palette if classes else [],
        "depth_unit": m.depth_unit,
        "capture": {"blocks": m.blocks, "layers": m.layers, "sigmas": m.sigmas, "concepts": m.concepts, "side": m.side},
        "dino": m.dino,
        "head": json.loads(json.dumps(m.config.to_dict())),  # its constructor arguments, as they read back
        "training": {k: v for k, v in train.items() if k != "eval"},
        "evaluation": {**train.get("eval", {}),
                       "metrics": scores if len(tasks) > 1 else ({tasks[0]: scores} if scores else {})},
    }


def card_text(config: dict) -> str:
    """The README.md of `config` (heads_config): YAML front matter as the Hub reads it, then the human text."""
    from huggingface_hub import ModelCardData

    heads, bb = config["heads"], config["backbone"]
    tasks = list(dict.fromkeys(t for h in heads.values() for t in h["tasks"]))
    tasks.sort(key=lambda t: list(TASKS).index(t) if t in TASKS else len(TASKS))  # seg, saliency, depth, others
    base = config["base_model"]
    front = ModelCardData(library_name=LIBRARY, license=config["license"], base_model=base,
                          tags=[LIBRARY, "mmdiff", "diffusion-features", "synthetic-data", *tasks]).to_yaml()
    lora = bb.get("lora") or []
    model = bb.get("name")
    lines = [
        f"---\n{front}\n---",
        f"# {', '.join(tasks)} heads for {model}",
        "",
        f"Light heads that decode {', '.join(tasks)} from the features the frozen diffusion transformer `{model}` "
        "computes while it generates an image (MMDiff): with mmdiff-gen every generated image "
        "comes with its labels from the same pass. This card and `config.json` are generated from what "
        "the head files record (`mmdiff-gen heads card`; `mmdiff-gen train` refreshes them): edits are overwritten.",
        "",
        "## Backbone",
        "",
        f"- `{bb.get('name')}` ({bb.get('family')})" + (f", [{base}](https://huggingface.co/{base})" if base else ""),
        f"- identity: transformer config sha256 `{bb.get('config_sha256')}`, "
        f"weights `{bb.get('weights') or NOT_RECORDED}`"
        + (", LoRA " + ", ".join(f"`{a.get('name')}`" for a in lora) if lora else ", no LoRA"),
        "- mmdiff-gen refuses these heads on any other backbone, other weights or another LoRA.",
        "",
        f"**Licence** (`license: {config['license']}`): the heads are trained on this backbone's features and run "
        "only together with it, so its licence terms apply to them and to what they generate"
        + (" (set another with `mmdiff-gen heads card DIR --license ID`)." if config["license"] == "other" else "."),
        "",
        "## Heads",
        "",
        "| file | tasks | classes | blocks: layers | sigmas | concepts | side maps | DINOv3 |",
        "|---|---|---|---|---|---|---|---|",
        *(f"| `{f}` | {', '.join(h['tasks'])} | {', '.join(h['classes']) or '—'} | {h['capture']['blocks']}: "
          f"{', '.join(map(str, h['capture']['layers']))} | {', '.join(f'{s:g}' for s in h['capture']['sigmas'])} | "
          f"{', '.join(h['capture']['concepts']) or '—'} | {h['capture']['side']} | {h['dino'].get('name') or 'no'} |"
          for f, h in heads.items()),
        "",
        "## Training",
        "",
        "| file | data | samples | epochs | steps | batch | lr |",
        "|---|---|---|---|---|---|---|",
        *(_training_row(f, h["training"]) for f, h in heads.items()),
        "",
        "## Evaluation",
        "",
        "| file | task | data | samples | metrics |",
        "|---|---|---|---|---|",
        *(row for f, h in heads.items() for row in _evaluation_rows(f, h["evaluation"])),
        "",
        "## Use",
        "",
        "```bash",
        f"mmdiff-gen generate --model {model} --heads ORG/NAME --tasks {','.join(tasks)} --prompts prompts.txt "
        "--out data/",
        "```",
        "",
        "`--heads` takes this repo's id (read from the local Hugging Face cache, else downloaded: only "
        f"{', '.join(f'`{p}`' for p in REPO_FILES)}) or a local copy of this folder; on a machine without internet, "
        "`hf download ORG/NAME` first where there is one.",
        "",
        "## Limitations",
        "",
        "- They read this backbone's features at the capture settings above and nothing else.",
        "- The scores above are on the evaluation data named, in real-image mode; on generated images labels are "
        "as good as the backbone renders the prompt (`generate --min-quality` filters by the heads' confidence).",
    ]
    classes = next((h["classes"] for h in heads.values() if h["classes"]), [])
    if classes:
        lines.append(f"- Segmentation knows only its classes ({', '.join(classes)}); other names: `--tasks openseg`.")
    unit = next((h["depth_unit"] for h in heads.values() if h["depth_unit"]), "")
    if unit:
        lines.append(f"- Depth ({unit}) is at the scale and range of its training data.")
    return "\n".join(lines) + "\n"


def _value(v) -> str:
    return NOT_RECORDED if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def _training_row(file: str, t: dict) -> str:
    cfg = t.get("config", {})
    cells = map(_value, (t.get("data"), t.get("samples"), cfg.get("epochs"), t.get("steps"), cfg.get("batch_size"),
                         cfg.get("lr")))
    return f"| `{file}` | " + " | ".join(cells) + " |"


def _evaluation_rows(file: str, e: dict) -> list[str]:
    """A row per task: the data it was scored on ("voc:PATH val": the dataset and its split) and its scores."""
    data, n = _value(e.get("data")), _value(e.get("samples"))
    if not e["metrics"]:
        return [f"| `{file}` | — | {data} | {n} | not evaluated |"]
    return [f"| `{file}` | {task} | {data} | {n} | "
            + ", ".join(f"{k} {v:.4g}" for k, v in scores.items() if isinstance(v, (int, float))) + " |"
            for task, scores in e["metrics"].items()]
