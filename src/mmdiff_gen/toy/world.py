"""A seeded procedural toy world: 64×64 scenes with exact segmentation, saliency and depth.

A wall and a floor seen by a pinhole camera (horizon at a random height), 1–3 flat objects standing
on the floor, drawn far to near so nearer objects occlude farther ones. Every scene has a caption
that names each object's size, color, class and position.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64  # image side in pixels

# Segmentation ids (0 = background). The order is the checkpoint format: append, never reorder.
CLASSES: tuple[str, ...] = ("background", "circle", "square", "triangle", "star", "ring", "cross")
SHAPES: tuple[str, ...] = CLASSES[1:]
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (235, 215, 40),
    "purple": (150, 60, 190), "orange": (245, 140, 30), "white": (240, 240, 240), "black": (25, 25, 25),
}
# Object sides in pixels: an object spans several 8-px image tokens (the first attempt's 10–14 px
# objects covered 2–3 tokens and came out as blobs).
SIZES: dict[str, tuple[int, int]] = {"small": (18, 22), "large": (28, 34)}
POSITIONS: dict[str, float] = {"left": 0.22, "center": 0.5, "right": 0.78}  # x centre as a fraction of width
PLACE_WORDS = {"left": "on the left", "center": "in the center", "right": "on the right"}
PALETTE: tuple[tuple[int, int, int], ...] = ((0, 0, 0),) + (
    (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), (128, 0, 128), (0, 128, 128)
)  # VOC-style colours for previews, one per class

# Camera: focal length in pixels and height in metres; the wall stands at WALL_DEPTH metres.
FOCAL = 64.0
CAMERA_HEIGHT = 1.5
WALL_DEPTH = 8.0
MIN_VISIBLE = 0.5  # each object keeps at least half of its pixels, so the caption stays true
SHADE = (0.7, 1.1)  # an object pixel is its colour × a shading factor in this range (lit from above-left)


@dataclass(frozen=True)
class Thing:
    """One object of a scene."""

    shape: str
    color: str
    size: str
    position: str
    side: int  # pixels
    cx: float  # centre column
    bottom: int  # contact row on the floor
    depth: float  # metres, the depth of the contact point

    @property
    def class_id(self) -> int:
        return CLASSES.index(self.shape)

    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape} {PLACE_WORDS[self.position]}"


@dataclass
class Scene:
    """A rendered scene with exact labels.

    Attributes:
        image: (64, 64, 3) uint8.
        seg: (64, 64) uint8 class ids.
        saliency: (64, 64) uint8, 255 on object pixels.
        depth: (64, 64) float32 metres.
        caption: names every object's size, color, class and position, left to right.
        things: the objects, far to near (drawing order).
        horizon: the wall–floor row.
    """

    image: np.ndarray
    seg: np.ndarray
    saliency: np.ndarray
    depth: np.ndarray
    caption: str
    things: list[Thing]
    horizon: int

    def meta(self) -> dict:
        return {"caption": self.caption, "horizon": self.horizon, "things": [asdict(t) for t in self.things]}


def caption_of(things: Sequence[Thing]) -> str:
    parts = [t.phrase() for t in sorted(things, key=lambda t: t.cx)]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption_slots(caption: str) -> dict[str, tuple[str, str, str]]:
    """Inverse of caption_of on what captions name: position → (shape, color, size) of the object there."""
    words = caption.replace(",", " and").split()
    slots = {}
    for phrase in " ".join(words).split(" and "):
        _, size, color, shape, *place = phrase.split()
        position = next(p for p, w in PLACE_WORDS.items() if w.split() == place)
        slots[position] = (shape, color, size)
    return slots


def floor_depth(rows: np.ndarray, horizon: int) -> np.ndarray:
    """Depth in metres of floor rows below the wall–floor line (pinhole camera over a flat floor)."""
    vanish = horizon - FOCAL * CAMERA_HEIGHT / WALL_DEPTH  # the floor's vanishing row, above the wall line
    return (FOCAL * CAMERA_HEIGHT / np.maximum(rows + 0.5 - vanish, 1e-3)).astype(np.float32)


def shape_mask(shape: str, side: int) -> np.ndarray:
    """(side, side) bool mask of one shape, drawn with PIL at pixel resolution."""
    img = Image.new("L", (side, side), 0)
    d = ImageDraw.Draw(img)
    s = side - 1
    c = s / 2
    if shape == "circle":
        d.ellipse((0, 0, s, s), fill=1)
    elif shape == "square":
        m = round(side * 0.08)
        d.rectangle((m, m, s - m, s - m), fill=1)
    elif shape == "triangle":
        d.polygon([(c, 0), (s, s), (0, s)], fill=1)
    elif shape == "star":
        pts = []
        for k in range(10):  # deep points survive the VAE better than shallow ones
            r = c if k % 2 == 0 else c * 0.42
            a = -np.pi / 2 + k * np.pi / 5
            pts.append((c + r * np.cos(a), c + 0.08 * s + r * np.sin(a)))
        d.polygon(pts, fill=1)
    elif shape == "ring":
        d.ellipse((0, 0, s, s), fill=1)
        h = side * 0.27  # a hole of about half the diameter
        d.ellipse((c - h, c - h, c + h, c + h), fill=0)
    elif shape == "cross":
        w = side * 0.17
        d.rectangle((c - w, 0, c + w, s), fill=1)
        d.rectangle((0, c - w, s, c + w), fill=1)
    else:
        raise KeyError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return np.asarray(img, dtype=bool)


def _texture(rng: np.random.Generator, base: np.ndarray, amp: float) -> np.ndarray:
    """Low-frequency noise around a base colour: bilinear upsampling of an 8×8 random grid."""
    grid = rng.normal(0, amp, (8, 8)).astype(np.float32)
    up = np.asarray(Image.fromarray(grid, mode="F").resize((SIZE, SIZE), Image.BILINEAR))
    return base[None, None, :] + up[..., None]


def sample_things(rng: np.random.Generator, horizon: int, n: int | None = None) -> list[Thing]:
    """1–3 objects at distinct positions, contact points on the floor, sorted far to near."""
    n = int(rng.integers(1, 4)) if n is None else n
    places = rng.choice(list(POSITIONS), size=n, replace=False)
    things = []
    for pos in places:
        size = str(rng.choice(list(SIZES)))
        side = int(rng.integers(SIZES[size][0], SIZES[size][1] + 1))
        bottom = int(rng.integers(max(horizon + 6, side - 1), SIZE))  # the object's top stays inside
        cx = POSITIONS[pos] * SIZE + rng.uniform(-3, 3)
        things.append(Thing(
            shape=str(rng.choice(SHAPES)), color=str(rng.choice(list(COLORS))), size=size, position=str(pos),
            side=side, cx=float(cx), bottom=bottom, depth=float(floor_depth(np.array([bottom]), horizon)[0]),
        ))
    return sorted(things, key=lambda t: -t.depth)


def render(rng: np.random.Generator, things: list[Thing], horizon: int) -> Scene:
    """Draw the room, then the objects far to near; labels follow the same occlusion."""
    rows = np.arange(SIZE, dtype=np.float32)[:, None].repeat(SIZE, 1)
    # Desaturated room colours (a grey level and a faint tint) keep every object colour distinct.
    wall_c = (rng.uniform(115, 185) * rng.uniform(0.92, 1.08, 3)).astype(np.float32)
    floor_c = (rng.uniform(70, 135) * rng.uniform(0.9, 1.1, 3)).astype(np.float32)
    wall = _texture(rng, wall_c, 6.0)
    floor = _texture(rng, floor_c, 8.0) * (0.8 + 0.2 * (rows[..., None] - horizon) / (SIZE - horizon))
    is_floor = rows >= horizon
    image = np.where(is_floor[..., None], floor, wall)
    depth = np.where(is_floor, floor_depth(rows, horizon), np.float32(WALL_DEPTH)).astype(np.float32)
    seg = np.zeros((SIZE, SIZE), np.uint8)

    kept = []
    for t in things:  # far to near
        mask = shape_mask(t.shape, t.side)
        top, left = t.bottom - t.side + 1, int(round(t.cx - t.side / 2))
        full = np.zeros((SIZE, SIZE), bool)
        ys, xs = np.nonzero(mask)
        ys, xs = ys + top, xs + left
        inside = (ys >= 0) & (ys < SIZE) & (xs >= 0) & (xs < SIZE)
        full[ys[inside], xs[inside]] = True
        # Mild shading: lit from above-left, darker towards the bottom-right.
        shade = 1.08 - 0.25 * (rows - top) / t.side - 0.08 * (np.arange(SIZE)[None] - left) / t.side
        color = np.array(COLORS[t.color], np.float32)
        obj = color[None, None] * np.clip(shade, *SHADE)[..., None] + rng.normal(0, 4, (SIZE, SIZE, 1))
        image = np.where(full[..., None], obj, image)
        depth = np.where(full, np.float32(t.depth), depth)
        seg = np.where(full, np.uint8(t.class_id), seg)
        kept.append((t, full))
    # A thing's visible pixels: its mask minus what nearer things cover.
    cover = np.zeros((SIZE, SIZE), bool)
    for t, full in reversed(kept):
        visible = full & ~cover
        if visible.sum() < MIN_VISIBLE * full.sum():
            raise _Hidden
        cover |= full
    return Scene(
        image=np.clip(image, 0, 255).round().astype(np.uint8),
        seg=seg,
        saliency=np.where(seg > 0, 255, 0).astype(np.uint8),
        depth=depth,
        caption=caption_of(things),
        things=things,
        horizon=horizon,
    )


class _Hidden(Exception):
    """An object is mostly hidden: the layout is redrawn."""


def render_scene(seed: int, n_objects: int | None = None) -> Scene:
    """The scene of one seed (deterministic: same seed, same pixels and labels)."""
    rng = np.random.default_rng(seed)
    while True:
        horizon = int(rng.integers(18, 35))
        things = sample_things(rng, horizon, n_objects)
        try:
            return render(rng, things, horizon)
        except _Hidden:
            continue


def random_caption(rng: np.random.Generator, n_objects: int) -> str:
    """A caption the world could draw (for prompt-fidelity checks on fresh prompts)."""
    return caption_of(sample_things(rng, horizon=26, n=n_objects))


def vocabulary() -> tuple[str, ...]:
    """Every word a caption can use, for the toy backbone's word-level tokenizer."""
    words = ["a", "and", ","] + list(COLORS) + list(SHAPES) + list(SIZES)
    for phrase in PLACE_WORDS.values():
        words += phrase.split()
    return tuple(dict.fromkeys(words))
