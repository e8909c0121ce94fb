"""Trained heads (and the zero-shot grounding reader) as one annotator: which capture they need, and label
maps plus a per-sample quality score from what a pass captured."""

from __future__ import annotations

import contextlib
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..backbones.dino import DinoFeatures, images_tensor
from ..capture import CaptureResult, CaptureSpec
from ..heads.checkpoint import HeadMeta, HeadMismatch, head_paths, load_head, read_meta
from ..heads.frames import to_frames
from ..heads.inputs import reads_concepts, reads_cross, run_head
from ..heads.model import MMDiffHead, head_precision, predictions
from ..heads.openseg import OpenSegConfig, class_maps, segment
from ..heads.quality import CONFIDENCE, agreement
from ..tasks import TASKS, class_task, trained as trained_tasks
from ..tasks import get as get_task


# A Hub model repo id, optionally with one of its files: org/name, org/name/seg.safetensors.
_HEADS_REPO = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:/(?P<file>[\w.-]+\.safetensors))?")


def resolve_heads(source: str | Path) -> Path:
    """The local path of heads given as a path (a head file or a heads folder) or a Hub repo id `org/name`
    (optionally `org/name/FILE.safetensors`): a local path of that name first, else the repo's snapshot in the
    local HF cache, else downloaded when the Hub is reachable (`heads.card.REPO_FILES` only: no pickles).
    FileNotFoundError saying how to get a repo that is neither here nor reachable."""
    from ..backbones.loading import hub_cache, hub_snapshot
    from ..heads.card import REPO_FILES

    path = Path(source).expanduser()
    repo = _HEADS_REPO.fullmatch(str(source))
    if path.exists() or repo is None:
        return path  # a missing local path is head_files' "heads not found"
    folder = hub_snapshot(repo["repo"], REPO_FILES, download=True)
    if folder is None:
        raise FileNotFoundError(f"heads {repo['repo']!r} are neither a local folder nor in the local Hugging Face "
                                f"cache ({hub_cache()}), and the Hub did not serve them: run `hf download "
                                f"{repo['repo']}` on a machine with internet (HF_HUB_CACHE names the cache), or pass "
                                "a local folder")
    return folder / repo["file"] if repo["file"] else folder


def head_files(source: str | Path, tasks: list[str]) -> dict[str, Path]:
    """Head file per task from a head file, or a heads folder or Hub repo (`resolve_heads`): TASK.safetensors for
    each task first, then any other head file there that predicts it (a multi-task head serves all its tasks)."""
    source = resolve_heads(source)
    if source.is_file():
        found = dict.fromkeys(read_meta(source).config.tasks, source)
    elif source.is_dir():
        found = {t: source / f"{t}.safetensors" for t in TASKS if (source / f"{t}.safetensors").is_file()}
        for path in head_paths(source) if set(tasks) - set(found) else ():
            if path not in found.values():
                found = dict.fromkeys(read_meta(path).config.tasks, path) | found
    else:
        raise HeadMismatch(f"heads not found: {source}")
    missing = [t for t in tasks if t not in found]
    if missing:
        raise HeadMismatch(f"{source} has no head for {', '.join(missing)} (it has: {', '.join(found) or 'none'})")
    return {t: found[t] for t in tasks}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Annotation:
    """Label maps of one batch and one quality record per sample.

    labels: task → (B, H, W): seg / openseg uint8 ids, saliency uint8 0–255, depth float metres.
    quality: per sample {"score", and each signal}: seg_confidence (mean top softmax probability),
        saliency_confidence (mean |2p − 1|), openseg_confidence (mean winning normalised attention),
        agreement (mean IoU of the decoder's and the zero-shot segmentation over the classes either
        finds). See `quality_score` for the score.
    """

    labels: dict[str, torch.Tensor]
    quality: list[dict[str, float]] = field(default_factory=list)


def quality_score(signals: dict[str, float]) -> float | None:
    """The mean of the trained heads' confidences present in `signals`; without any, the mean of the zero-shot
    signals (openseg's confidence, agreement); None when there is neither (depth only).

    By preference: on the toy world, ranking by the heads' own confidences raises segmentation consistency
    with the oracle, while the zero-shot signals do not (its grounding attention is weak there: 14–21 mIoU);
    they are recorded, and score openseg-only runs."""
    heads = [t.confidence for t in TASKS.values() if t.trained and t.confidence]
    for group in (heads, [get_task("openseg").confidence, "agreement"]):
        vals = [signals[k] for k in group if k in signals]
        if vals:
            return sum(vals) / len(vals)
    return None


@dataclass
class _Head:
    model: MMDiffHead
    meta: HeadMeta
    path: Path
    tasks: list[str]  # the requested tasks it serves (a multi-task head may serve more than asked)


class Annotator:
    """The heads of the requested tasks, checked against one backbone.

    Args:
        files: head file per trained task (`head_files`); tasks sharing a multi-task head file run it once.
        backbone: the backbone's identity(); a head trained on another backbone is refused.
        device: where the heads run (the backbone's device, so features never leave it).
        precision: "auto" (bf16 autocast on CUDA, float32 elsewhere), "bf16" or "fp32" (heads.head_precision).
        dino: the DINOv3 features, needed exactly when a head was trained with them.
        openseg: the zero-shot segmentation task (Seg4Diff), with `token_positions` — the backbone's
            `class_token_positions` — to find each class's words in the prompts.
    """

    def __init__(self, files: dict[str, Path], backbone: dict, device: str | torch.device = "cpu",
                 dino: DinoFeatures | None = None, openseg: OpenSegConfig | None = None,
                 token_positions: Callable | None = None, precision: str = "auto"):
        self.heads: dict[Path, _Head] = {}
        self.device, self.precision = device, precision
        head_precision(device, precision)  # refuses an unknown precision now, not at the first batch
        self.dino = dino
        self.openseg = openseg
        self.token_positions = token_positions
        if openseg is not None and token_positions is None:
            raise ValueError("open-vocabulary segmentation needs the backbone's class_token_positions")
        for task, path in files.items():
            path = Path(path)
            if path in self.heads:
                self.heads[path].tasks.append(task)
                continue
            model, meta = load_head(path, backbone=backbone, device=device)
            if task not in meta.config.tasks:
                raise HeadMismatch(f"{path} is a {meta.config.name} head, not a {task} head")
            if meta.dino and dino is None:
                raise HeadMismatch(f"the {meta.config.name} head was trained with DINOv3 features "
                                   f"({meta.dino.get('name')}): pass --dino PATH")
            if meta.dino:
                dino.check(meta.dino, f"the {meta.config.name} head")
            self.heads[path] = _Head(model, meta, path, [task])
        metas = [h.meta for h in self.heads.values()]
        # One capture serves every head: the union of their layers, sigmas and concepts, of one block list.
        blocks = {m.blocks for m in metas}
        if len(blocks) > 1:
            raise HeadMismatch(f"these heads read different blocks ({', '.join(sorted(blocks))}): one generation "
                               "pass captures one block list; use heads trained on the same one")
        self.blocks = blocks.pop() if blocks else "feature"
        self.layers = tuple(sorted({i for m in metas for i in m.layers}))
        sigmas = {s for m in metas for s in m.sigmas} | ({openseg.sigma} if openseg else set())
        self.sigmas = tuple(sorted(sigmas, reverse=True))
        words: list[str] = []
        for m in metas:
            words += [w for w in m.concepts if w not in words]
        self.concepts = tuple(words)
        self.cross = any(reads_cross(m.side) for m in metas)

    @property
    def tasks(self) -> list[str]:
        return [t for h in self.heads.values() for t in h.tasks] + (["openseg"] if self.openseg else [])

    def spec(self, store_dtype: str = "bfloat16") -> CaptureSpec:
        """What the generation pass must capture for these heads (kept on the backbone's device)."""
        return CaptureSpec(layers=self.layers or (0,), blocks=self.blocks, sigmas=self.sigmas, concepts=self.concepts,
                           cross_attention=self.cross, store_dtype=store_dtype,
                           text_attention_layers=(self.openseg.layer,) if self.openseg else ())

    def identity(self) -> dict:
        """Per task: the file name and sha256, what it reads, and the metrics it reports (openseg: its config)."""
        extra = {"openseg": {"sha256": "", **self.openseg.to_dict()}} if self.openseg else {}
        return extra | {t: {"file": h.path.name, "sha256": _sha256(h.path), "classes": h.meta.classes,
                            "layers": h.meta.layers, "blocks": h.meta.blocks,
                    "sigmas": h.meta.sigmas, "concepts": h.meta.concepts, "side": h.meta.side,
                    "dino": h.meta.dino, "metrics": h.meta.metrics} for h in self.heads.values() for t in h.tasks}

    def _classes_head(self) -> _Head | None:
        return next((h for h in self.heads.values() if class_task(h.tasks)), None)

    @property
    def classes(self) -> list[str]:
        h = self._classes_head()
        return h.meta.classes if h else []

    @property
    def palette(self) -> list[list[int]]:
        h = self._classes_head()
        return h.meta.palette if h else []

    @property
    def depth_unit(self) -> str:
        """The unit of the positive-valued (depth) outputs ("metre"), else ""."""
        return next((h.meta.depth_unit for h in self.heads.values() for t in h.tasks
                     if get_task(t).kind == "positive"), "")

    @torch.no_grad()
    def __call__(self, cap: CaptureResult, size: tuple[int, int], images=None, prompts=None) -> Annotation:
        """Label maps at `size` (H, W) and per-sample quality.

        `images` (the generated PIL images) feed the DINOv3 features of heads trained with them;
        `prompts` locate the class words for openseg."""
        labels, signals = {}, {}
        extra = None
        clip = cap.frames is not None  # a video backbone's: per-latent-frame outputs spread over the decoded frames
        if clip and (self.openseg is not None or any(h.meta.dino for h in self.heads.values())):
            raise ValueError("openseg and DINOv3 features read images: a video backbone's clips take trained heads "
                             "only")
        if any(h.meta.dino for h in self.heads.values()):
            if images is None:
                raise ValueError("these heads read DINOv3 features of the images: pass the images")
            extra = self.dino(images_tensor(images), cap.grid)  # (B, E, h, w)
        for h in self.heads.values():
            m = h.meta
            feats = cap.features[:, [cap.layers.index(i) for i in m.layers]]  # (B, L_head, T, N, C)
            steps = list(m.timestep_indices(list(cap.target_sigmas)))
            inputs = {"features": feats, "cross_attention": cap.cross_attention}
            if reads_concepts(m.side):  # (B, T, K_head, N): the head's concepts, in its order
                inputs["concept_maps"] = cap.concept_maps[:, :, [cap.concepts.index(w) for w in m.concepts]]
            with head_precision(self.device, self.precision):
                out = run_head(h.model, m.side, inputs, cap.grid, size, timesteps=steps,
                               extra=extra if m.dino else None, source="the capture")
            for task in h.tasks:
                x = to_frames(out[task], cap.frames).flatten(0, 1) if clip else out[task]  # (B[·F], ch, H, W)
                labels[task] = predictions(task, x).cpu()
                t = get_task(task)
                if t.confidence:
                    signals[t.confidence] = CONFIDENCE[t.kind](x).cpu()
                if clip:  # (B, F, H, W) labels; a clip's confidence is its frames' mean
                    labels[task] = labels[task].unflatten(0, (-1, cap.frames))
                    if t.confidence:
                        signals[t.confidence] = signals[t.confidence].view(-1, cap.frames).mean(1)
        if self.openseg is not None:
            if prompts is None:
                raise ValueError("openseg reads the prompts' class words: pass the prompts")
            o = self.openseg
            j = next(i for i, s in enumerate(cap.target_sigmas) if abs(s - o.sigma) < 1e-6)
            attention = cap.text_attention[:, j, cap.text_attention_layers.index(o.layer)]  # (B, N, S)
            maps = class_maps(attention, self.token_positions(prompts, o.classes), len(o.classes))
            ids, score = segment(maps, cap.grid, size, o.threshold)
            labels["openseg"] = ids.cpu()
            signals[get_task("openseg").confidence] = score.flatten(1).mean(1).cpu()
            h = self._classes_head()
            if h and list(o.classes) == list(self.classes):
                signals["agreement"] = agreement(labels[class_task(h.tasks)], labels["openseg"])
        b = cap.features.shape[0]
        quality = [{k: float(v[i]) for k, v in signals.items()} for i in range(b)]
        for q in quality:
            q["score"] = quality_score(q)
        return Annotation(labels, quality)


def plan_annotator(model: str, tasks: list[str], heads: str | Path | None = None,
                   classes: list[str] | None = None) -> tuple[dict[str, Path], list[str] | None]:
    """What an annotator for `tasks` will read, checked before any backbone loads (minutes for FLUX):
    the head file per trained task (from `heads` — a head file, a heads folder or a Hub repo id, `resolve_heads` —
    else the model's shipped heads) and openseg's class names (given, else the seg head's). HeadMismatch /
    ValueError name what is missing; FileNotFoundError, a Hub repo neither cached nor served."""
    from ..backbones.loading import DEFAULT_HEADS

    trained = [t for t in tasks if get_task(t).trained]
    heads = heads if heads is not None else DEFAULT_HEADS.get(model)
    if trained and heads is None:
        raise ValueError(f"no default heads for {model!r}: pass --heads (a folder of TASK.safetensors head files)")
    files = head_files(heads, trained) if trained else {}
    names = None
    if "openseg" in tasks:
        names = list(classes) if classes else None
        if names is None and heads is not None:  # the class names of the heads' classes task
            with contextlib.suppress(HeadMismatch):
                names = read_meta(head_files(heads, [class_task(trained_tasks())])[class_task(trained_tasks())]).classes
        if not names:
            raise ValueError("openseg needs class names: pass --classes background,cat,dog,…")
    return files, names


def build_annotator(backbone, files: dict[str, Path], classes: list[str] | None = None, grounding: dict | None = None,
                    dino: DinoFeatures | None = None, device: str | torch.device | None = None,
                    precision: str = "auto") -> Annotator:
    """The annotator of `files` on `backbone` (on its device unless `device`), with openseg when `classes` are
    given, read where the backbone's grounding default says unless `grounding` overrides layer / sigma /
    threshold (None values keep the default)."""
    openseg = None
    if classes:
        g = backbone.default_grounding() | {k: v for k, v in (grounding or {}).items() if v is not None}
        openseg = OpenSegConfig(classes=tuple(classes), layer=g["layer"], sigma=g["sigma"], threshold=g["threshold"])
    return Annotator(files, backbone.identity(), device=backbone.device if device is None else device, dino=dino,
                     openseg=openseg, token_positions=backbone.class_token_positions, precision=precision)

