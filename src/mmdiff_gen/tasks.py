"""The task registry: every layer learns what a task is here, and nowhere else.

A task is a name plus a *kind*, the family of behaviour it shares with other tasks:

| kind | label array | head output | loss | metrics | codec | resampling | confidence |
|---|---|---|---|---|---|---|---|
| "classes" | (H, W) uint8 ids, 255 = ignore | K logits | cross-entropy | mIoU | 8-bit PNG of ids | nearest | mean top softmax probability |
| "probability" | (H, W) uint8 0–255 | 1 logit | BCE + soft IoU | S_m, max F, MAE | 8-bit PNG | bilinear | mean abs(2p − 1) |
| "positive" | (H, W) float32, 0 = invalid | 1 channel, softplus | scale-invariant log | AbsRel, RMSE, δ | 16-bit PNG × scale | nearest | — |

Each layer implements the kinds once (the decoder tails in `heads/dpt.py`, predictions in `heads/model.py`,
confidences in `heads/quality.py`, losses in `train/losses.py`, metrics in `train/evaluate.py`, codecs in
`io/members.py`) and reads everything task-specific — decoder, member suffix, folder, concept set, whether
it is trained — from the `Task` here. So adding a task (edges, a second depth) is one `register` call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

KINDS = ("classes", "probability", "positive")
DECODERS = ("deeplab", "dpt")


@dataclass(frozen=True)
class Task:
    """One task.

    Args:
        name: the canonical name: head configs, label dicts, dataset.json and the CLI use it.
        kind: "classes", "probability" or "positive" (the table above).
        member: the WebDataset member suffix of its label PNG ("seg.png": KEY.seg.png).
        folder: its folder in the files layouts, the COCO export and label folders of `folder:` datasets.
        decoder: "deeplab" or "dpt" for a trained head (MMDiff §3.4: DeepLabV3+ for segmentation, DPT for
            dense regression); None for a zero-shot task (openseg, read from the grounding attention).
        concepts: the default concept words of its heads (MMDiff App. E: the best set per task).
        aliases: other names the CLI accepts.
    """

    name: str
    kind: str
    member: str
    folder: str
    decoder: str | None = "dpt"
    concepts: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name!r}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.decoder is not None and self.decoder not in DECODERS:
            raise ValueError(f"task {self.name!r}: decoder must be one of {', '.join(DECODERS)} or None")
        if self.decoder == "deeplab" and self.kind != "classes":
            raise ValueError(f"task {self.name!r}: DeepLabV3+ predicts classes; a {self.kind} task takes dpt")
        object.__setattr__(self, "concepts", tuple(self.concepts))
        object.__setattr__(self, "aliases", tuple(self.aliases))

    @property
    def video_member(self) -> str:
        """The member of a clip's labels, every frame in one array (io.members: "seg.npz")."""
        return self.member.rsplit(".", 1)[0] + ".npz"

    @property
    def trained(self) -> bool:
        """Whether a head is trained for it (False: zero-shot)."""
        return self.decoder is not None

    @property
    def label_dtype(self) -> str:
        """numpy dtype of its label arrays."""
        return "float32" if self.kind == "positive" else "uint8"

    @property
    def confidence(self) -> str | None:
        """The name of its per-sample confidence signal in quality records (None: it has none)."""
        return None if self.kind == "positive" else f"{self.name}_confidence"


TASKS: dict[str, Task] = {}
# Names a task cannot take: the feature cache stores labels beside these tensors, by task name.
RESERVED = ("features", "concept_maps", "cross_attention", "dino", "index", "image")


def register(task: Task) -> Task:
    """Add `task`; its name and aliases must be new."""
    taken = [n for n in (task.name, *task.aliases) if n in TASKS or n in RESERVED
             or any(n in t.aliases for t in TASKS.values())]
    if taken:
        raise ValueError(f"task name {taken[0]!r} is taken")
    if any(t.member == task.member or t.folder == task.folder for t in TASKS.values()):
        raise ValueError(f"task {task.name!r}: member {task.member!r} or folder {task.folder!r} is taken")
    TASKS[task.name] = task
    return task


def unregister(name: str) -> None:
    TASKS.pop(name, None)


def get(name: str) -> Task:
    """The task called `name` (or one of its aliases); KeyError naming the known ones."""
    if name in TASKS:
        return TASKS[name]
    for t in TASKS.values():
        if name in t.aliases:
            return t
    raise KeyError(f"unknown task {name!r}; known: {known()}")


def known() -> str:
    """"seg, saliency (sal), depth, openseg" — for messages."""
    return ", ".join(t.name + (f" ({', '.join(t.aliases)})" if t.aliases else "") for t in TASKS.values())


def canonical(names: Sequence[str]) -> tuple[str, ...]:
    """Canonical names, in order, without repeats; KeyError at the first unknown one."""
    return tuple(dict.fromkeys(get(n).name for n in names))


def trained() -> list[str]:
    """The tasks a head is trained for, in registration order."""
    return [t.name for t in TASKS.values() if t.trained]


def quality_tasks() -> list[str]:
    """The tasks with a per-sample confidence signal."""
    return [t.name for t in TASKS.values() if t.confidence]


def class_task(tasks: Sequence[str]) -> str | None:
    """The first trained "classes" task among `tasks` — the one whose class names a dataset carries."""
    return next((n for n in tasks if get(n).kind == "classes" and get(n).trained), None)


register(Task("seg", "classes", "seg.png", "seg", decoder="deeplab",
              concepts=("object", "background", "detail", "edges")))
register(Task("saliency", "probability", "sal.png", "saliency", concepts=("background", "object", "edges", "salient",
                                                                          "contour"), aliases=("sal",)))
register(Task("depth", "positive", "depth.png", "depth", concepts=("depth", "surface", "object", "near", "far")))
# Seg4Diff's zero-shot segmentation: class maps from the grounding block's image→text attention, no head.
register(Task("openseg", "classes", "openseg.png", "openseg", decoder=None))
