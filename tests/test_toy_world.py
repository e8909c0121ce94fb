"""The toy world: determinism and label consistency."""

import numpy as np
import pytest

from mmdiff_gen.io.files import read_sample
from mmdiff_gen.toy.render import write_scenes
from mmdiff_gen.toy.world import (
    CLASSES,
    COLORS,
    SHAPES,
    WALL_DEPTH,
    caption_slots,
    render_scene,
    shape_mask,
    vocabulary,
)

SEEDS = range(60)


def test_same_seed_same_scene():
    a, b = render_scene(123), render_scene(123)
    for name in ("image", "seg", "saliency", "depth"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert a.caption == b.caption
    assert not np.array_equal(a.image, render_scene(124).image)


@pytest.mark.parametrize("seed", SEEDS)
def test_labels_agree_with_each_other_and_the_caption(seed):
    s = render_scene(seed)
    assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
    # saliency is exactly the union of object pixels
    assert np.array_equal(s.saliency > 0, s.seg > 0)
    # the classes in the segmentation are those the caption names
    named = {w for w in s.caption.replace(",", " ").split() if w in SHAPES}
    present = {CLASSES[i] for i in np.unique(s.seg) if i}
    assert present == named == {t.shape for t in s.things}
    for t in s.things:
        assert t.color in s.caption and f"{t.size} {t.color} {t.shape}" in s.caption
    # background depth: the wall is the far constant, the floor gets nearer towards the bottom
    bg = s.seg == 0
    assert np.all(s.depth[:s.horizon][bg[:s.horizon]] == WALL_DEPTH)
    col = s.depth[s.horizon:, 0][bg[s.horizon:, 0]]
    assert np.all(np.diff(col) <= 0) and np.all(s.depth > 0) and s.depth.max() <= WALL_DEPTH
    # every object pixel sits at its contact depth, and the nearest object wins every overlap
    for t in s.things:
        ys, xs = np.nonzero(_full_mask(t))
        on_top = [u for u in s.things if u is not t and _full_mask(u)[ys, xs].any()]
        for y, x in zip(ys, xs):
            covering = [u for u in on_top if _full_mask(u)[y, x]] + [t]
            nearest = min(covering, key=lambda u: u.depth)
            assert s.depth[y, x] == np.float32(nearest.depth)
            assert s.seg[y, x] == nearest.class_id


def _full_mask(t):
    m = np.zeros((64, 64), bool)
    ys, xs = np.nonzero(shape_mask(t.shape, t.side))
    ys, xs = ys + t.bottom - t.side + 1, xs + int(round(t.cx - t.side / 2))
    keep = (ys >= 0) & (ys < 64) & (xs >= 0) & (xs < 64)
    m[ys[keep], xs[keep]] = True
    return m


def test_shapes_are_distinct_and_rings_have_holes():
    masks = {s: shape_mask(s, 30) for s in SHAPES}
    for a in SHAPES:
        for b in SHAPES:
            if a < b:
                assert (masks[a] != masks[b]).mean() > 0.05, (a, b)
    assert not masks["ring"][15, 15] and masks["ring"][15, 2]


def test_vocabulary_covers_every_caption():
    vocab = set(vocabulary())
    for seed in SEEDS:
        assert set(render_scene(seed).caption.replace(",", " , ").split()) <= vocab
    assert set(COLORS) <= vocab


def test_caption_slots_read_back_every_object():
    for seed in SEEDS:
        s = render_scene(seed)
        assert caption_slots(s.caption) == {t.position: (t.shape, t.color, t.size) for t in s.things}


def test_write_scenes_round_trips_losslessly(tmp_path):
    write_scenes(tmp_path, 3, seed=40)
    for seed in range(40, 43):
        got = read_sample(tmp_path, f"{seed:09d}")
        s = render_scene(seed)
        assert np.array_equal(got["image"], s.image) and np.array_equal(got["seg"], s.seg)
        assert np.array_equal(got["saliency"], s.saliency)
        assert np.abs(got["depth"] - s.depth).max() <= 0.0005  # 16-bit millimetres
    assert len((tmp_path / "meta.jsonl").read_text().splitlines()) == 3
