"""A seeded toy video world: clips of the image world's room whose objects move, with exact per-frame labels.

A clip's first frame has the layout of the image world's scene of the same seed (`world.render_scene`):
the same horizon and objects. The camera is static; each object then moves at constant velocity in the
world — sideways, towards the camera, away from it, or not at all — and every frame is drawn by
`world.render`, so shapes, colours, shading, occlusion and metric depth follow the image world's rules.
Clips have F = 4k + 1 frames because the Wan VAE compresses time 4× after the first frame.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace

import numpy as np

from mmdiff_gen.toy.world import (
    CAMERA_HEIGHT,
    FOCAL,
    POSITIONS,
    SIZE,
    SIZES,
    Scene,
    Thing,
    _Hidden,
    caption_of,
    caption_slots,
    floor_depth,
    render,
    render_scene,
    vocabulary,
)

TIME_STRIDE = 4  # Wan VAE: one latent frame for the first frame, then one per 4 frames
# Motion kind → the words a caption uses for it, after the image world's object phrase (which names where the
# object starts). The order is the order `video_vocabulary` lists them in.
MOTIONS: dict[str, str] = {
    "right": "moving to the right", "left": "moving to the left", "still": "standing still",
    "closer": "coming closer", "away": "moving away",
}
# A sideways mover crosses this many pixels over the whole clip, whatever F (0.75–1.75 px a frame at F = 17):
# several frames per 8-px token, so consecutive frames differ by sub-token shifts, as real video does.
TRAVEL = (12.0, 28.0)
# A depth mover's side changes by at least this many pixels; it ends at the far end of its size word's side
# range (world.SIZES), so the caption's size word stays true in every frame.
MIN_GROWTH = 3
# An object may reach past the image's left or right edge by at most this fraction of its side (the image
# world's own placements reach up to ~0.18), so it never leaves the clip.
EDGE_CUT = 0.25
# An object stands still with this probability (as if the five motions were equally likely), else it takes one of
# the moves open to it (drawing uniformly among still and those made 40% of objects and 19% of clips still;
# this makes 26% and 9%).
STILL = 0.2
_MOTION_STREAM = 1  # the motions' random stream: apart from the layout's, which is render_scene's own


@dataclass(frozen=True)
class Mover:
    """One object of a clip.

    Attributes:
        start: the object in the first frame, as the image world places it (`position` names where it starts).
        end: the object in the last frame; `position` is the place word nearest its end centre.
        motion: a key of MOTIONS.
    """

    start: Thing
    end: Thing
    motion: str

    @property
    def cx(self) -> float:
        """Where the object starts: `world.caption_of` orders objects by this, as it orders a scene's things."""
        return self.start.cx

    def phrase(self) -> str:
        return f"{self.start.phrase()} {MOTIONS[self.motion]}"

    def at(self, t: float, horizon: int) -> Thing:
        """The object at clip time t ∈ [0, 1] (frame i of F is t = i / (F − 1)).

        Pinhole camera, constant world velocity: the world position (X, Z) moves linearly from start to end, so
        Z(t)/Z0 = 1 + t · (side0/side1 − 1), the side and the contact row's offset below the floor's vanishing row
        scale with Z0/Z(t), and the centre has covered t · Z1/Z(t) of its image path. With no depth change this
        is linear motion in x; with no motion at all every pose is exactly the start.
        """
        s, e = self.start, self.end
        ratio = s.side / e.side  # Z1 / Z0
        w = 1 + t * (ratio - 1)  # Z(t) / Z0
        return _seen(s, 1 / w, cx=s.cx + (e.cx - s.cx) * t * ratio / w, horizon=horizon)


@dataclass
class Clip:
    """A rendered clip with exact per-frame labels.

    Attributes:
        frames: (F, 64, 64, 3) uint8.
        seg: (F, 64, 64) uint8 class ids (world.CLASSES).
        saliency: (F, 64, 64) uint8, 255 on object pixels.
        depth: (F, 64, 64) float32 metres.
        caption: names every object's size, colour, class, start place and motion, left to right as they start.
        objects: the movers, far to near in the first frame (its drawing order, as Scene.things).
        horizon: the wall–floor row (the same in every frame: the camera is static).
    """

    frames: np.ndarray
    seg: np.ndarray
    saliency: np.ndarray
    depth: np.ndarray
    caption: str
    objects: list[Mover]
    horizon: int

    def pose(self, i: int) -> list[Thing]:
        """The objects in frame i, far to near (drawing order)."""
        return _poses(self.objects, i / (len(self.frames) - 1), self.horizon)

    def meta(self) -> dict:
        return {
            "caption": self.caption, "horizon": self.horizon, "frames": len(self.frames),
            "objects": [{"motion": m.motion, "start": asdict(m.start), "end": asdict(m.end)} for m in self.objects],
        }


def render_clip(seed: int, frames: int = 17, n_objects: int | None = None) -> Clip:
    """The clip of one seed (deterministic: same seed, same pixels and labels).

    Args:
        seed: non-negative; frame 0's layout is `world.render_scene(seed, n_objects)`'s.
        frames: F = 4k + 1 with k ≥ 1 (5, 9, 13, 17, …).
        n_objects: 1–3, or None for the image world's random count.
    """
    if frames < TIME_STRIDE + 1 or (frames - 1) % TIME_STRIDE:
        raise ValueError(f"frames must be 4k + 1 with k ≥ 1 (5, 9, 13, 17, …), got {frames}")
    if n_objects is not None and not 1 <= n_objects <= len(POSITIONS):
        raise ValueError(f"n_objects must be 1–{len(POSITIONS)} or None, got {n_objects}")
    first = render_scene(seed, n_objects)
    rng = np.random.default_rng([seed, _MOTION_STREAM])
    paint_seed = int(rng.integers(2**32))
    times = np.linspace(0.0, 1.0, frames)
    while True:  # re-sample the motions until the last frame, like the first, shows every object; all-still does
        movers = [_sample_motion(rng, t, times, first.horizon) for t in first.things]  # far to near, as frame 0 draws
        if _visible_at_end(movers, first.horizon):
            break
    return _paint(movers, times, first.horizon, paint_seed)


def label_flicker(seg: np.ndarray) -> float:
    """Label flicker of a clip's segmentation: the fraction of pixels whose class id changes between
    consecutive frames, averaged over the F − 1 frame pairs.

    Exact labels flicker only where objects really move (0 for a static clip), so a predictor's excess flicker
    over the exact labels' measures its temporal inconsistency.

    Args:
        seg: (F, H, W) integer class ids, F ≥ 2.
    """
    if seg.ndim != 3 or len(seg) < 2:
        raise ValueError(f"seg must be (F, H, W) with F ≥ 2, got shape {seg.shape}")
    return float((seg[1:] != seg[:-1]).mean())  # every pair has H·W pixels: the mean over all is the pairs' mean


def video_caption_slots(caption: str) -> dict[str, tuple[str, str, str, str]]:
    """Inverse of a clip's caption: start place → (shape, color, size, motion) of the object starting there."""
    pattern = re.compile(" (" + "|".join(re.escape(w) for w in MOTIONS.values()) + ")")
    motion_of = {w: m for m, w in MOTIONS.items()}
    motions = [motion_of[w] for w in pattern.findall(caption)]
    slots = caption_slots(pattern.sub("", caption))  # what is left is an image-world caption, in the same order
    if len(motions) != len(slots):
        raise ValueError(f"not a clip caption (one motion per object): {caption!r}")
    return {place: (*obj, m) for (place, obj), m in zip(slots.items(), motions)}


def video_vocabulary() -> tuple[str, ...]:
    """Every word a clip caption can use: the image world's vocabulary plus the motion phrases' words."""
    words = list(vocabulary())
    for phrase in MOTIONS.values():
        words += phrase.split()
    return tuple(dict.fromkeys(words))


def _seen(t: Thing, k: float, cx: float, horizon: int) -> Thing:
    """t seen k× larger (k = Z0/Z: moved in depth) with its centre at column cx; its depth is the floor's at its
    new contact row, as world.py defines an object's depth."""
    # f · h / Z is the contact row's offset below the floor's vanishing row (the relation floor_depth inverts).
    bottom = round(t.bottom + FOCAL * CAMERA_HEIGHT / t.depth * (k - 1))
    place = min(POSITIONS, key=lambda p: abs(POSITIONS[p] * SIZE - cx))
    depth = float(floor_depth(np.array([bottom]), horizon)[0])
    return replace(t, side=round(t.side * k), cx=float(cx), bottom=bottom, depth=depth, position=place)


def _sample_motion(rng: np.random.Generator, t: Thing, times: np.ndarray, horizon: int) -> Mover:
    """A motion for an object placed by the image world that keeps it on the floor and in the image in every
    frame: sideways towards the other side or either way from the centre, in depth where its size word leaves
    MIN_GROWTH pixels of room, or none (always possible: the image world placed it)."""
    lo, hi = SIZES[t.size]
    moves = [m for m in MOTIONS if m not in ("still", t.position)]  # nothing starts at an edge and moves out
    moves = [m for m in moves if m != "closer" or hi - t.side >= MIN_GROWTH]
    moves = [m for m in moves if m != "away" or t.side - lo >= MIN_GROWTH]
    while True:  # re-sampled per object, so a move that does not fit is not traded for standing still
        motion = "still" if rng.random() < STILL else str(rng.choice(moves))
        if motion in ("left", "right"):
            travel = rng.uniform(*TRAVEL) * (1 if motion == "right" else -1)
            end = _seen(t, 1.0, cx=t.cx + travel, horizon=horizon)
        elif motion in ("closer", "away"):
            k = (hi if motion == "closer" else lo) / t.side  # magnification at the end
            end = _seen(t, k, cx=SIZE / 2 + (t.cx - SIZE / 2) * k, horizon=horizon)  # the world X stays put
        else:
            end = t
        mover = Mover(start=t, end=end, motion=motion)
        if all(_inside(mover.at(u, horizon), horizon) for u in times):
            return mover


def _poses(movers: list[Mover], t: float, horizon: int) -> list[Thing]:
    """The movers' objects at time t, far to near; objects at the same depth keep the first frame's drawing order
    (render_scene's), so frame 0 is drawn exactly as the image world drew it and the order never flickers."""
    return sorted((m.at(t, horizon) for m in movers), key=lambda p: -p.depth)


def _inside(p: Thing, horizon: int) -> bool:
    """On the floor, top row inside the image, at most EDGE_CUT of its side past the left or right edge."""
    return (p.bottom - p.side + 1 >= 0 and horizon < p.bottom < SIZE
            and EDGE_CUT * p.side <= p.cx <= SIZE - EDGE_CUT * p.side)


def _visible_at_end(movers: list[Mover], horizon: int) -> bool:
    """Whether the last frame, like the first, is a scene the image world accepts (each object at least
    world.MIN_VISIBLE visible); in between, crossing objects may hide each other."""
    try:
        render(np.random.default_rng(0), _poses(movers, 1.0, horizon), horizon)
    except _Hidden:  # world.render owns the visibility rule
        return False
    return True


def _paint(movers: list[Mover], times: np.ndarray, horizon: int, paint_seed: int) -> Clip:
    """Draw every frame: each object drawn alone by world.render over the room, composited far to near.

    world.render refuses a mostly hidden object, which crossing objects may be in between, so each object is
    rendered alone and composited here (the farthest one's render is the frame's base: the room plus it).
    Every render starts from the same generator state, so the room and the objects' pixel noise (σ = 4 grey
    levels, fixed to the image rather than to the object) are the same in every frame: a still clip's frames are
    identical.
    """
    alone: dict[Thing, Scene] = {}  # a still object is drawn once
    frames, segs, depths = [], [], []
    for t in times:
        layers = []
        for p in _poses(movers, t, horizon):
            if p not in alone:
                alone[p] = render(np.random.default_rng(paint_seed), [p], horizon)
            layers.append(alone[p])
        base = layers[0]
        image, seg, depth = base.image.copy(), base.seg.copy(), base.depth.copy()  # (64, 64, 3), (64, 64) ×2
        for s in layers[1:]:
            on = s.seg > 0
            image[on], seg[on], depth[on] = s.image[on], s.seg[on], s.depth[on]
        frames.append(image)
        segs.append(seg)
        depths.append(depth)
    seg = np.stack(segs)  # (F, 64, 64)
    return Clip(
        frames=np.stack(frames),
        seg=seg,
        saliency=np.where(seg > 0, 255, 0).astype(np.uint8),
        depth=np.stack(depths),
        caption=caption_of(movers),  # duck-typed: a Mover has the cx and phrase() that caption_of reads
        objects=movers,
        horizon=horizon,
    )
