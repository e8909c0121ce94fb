"""The toy video world: determinism, per-frame label consistency, motion, occlusion, captions, flicker."""

import numpy as np
import pytest

from mmdiff_gen.toy.video_world import (
    EDGE_CUT,
    MOTIONS,
    label_flicker,
    render_clip,
    video_caption_slots,
    video_vocabulary,
)
from mmdiff_gen.toy.world import CLASSES, MIN_VISIBLE, SHAPES, SIZE, SIZES, WALL_DEPTH, render, render_scene

SEEDS = range(6)  # each clip takes ~10–20 ms: a few are enough here


def _footprint(clip, pose):
    """(64, 64) bool: the object's in-image pixels as the image world draws it alone, before any occlusion."""
    return render(np.random.default_rng(0), [pose], clip.horizon).seg > 0


def _single(motion):
    """The first one-object clip (9 frames) whose object moves this way."""
    for seed in range(100):
        clip = render_clip(seed, frames=9, n_objects=1)
        if clip.objects[0].motion == motion:
            return clip
    raise AssertionError(f"no one-object clip moves {motion!r} in seeds 0–99")


def test_same_seed_same_clip():
    a, b = render_clip(7), render_clip(7)
    for name in ("frames", "seg", "saliency", "depth"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert a.caption == b.caption and a.meta() == b.meta()
    assert not np.array_equal(a.frames, render_clip(8).frames)


@pytest.mark.parametrize("frames", [5, 17])
def test_shapes_and_dtypes(frames):
    c = render_clip(3, frames=frames)
    assert c.frames.shape == (frames, SIZE, SIZE, 3) and c.frames.dtype == np.uint8
    assert c.seg.shape == c.saliency.shape == c.depth.shape == (frames, SIZE, SIZE)
    assert c.seg.dtype == c.saliency.dtype == np.uint8 and c.depth.dtype == np.float32
    assert c.meta()["frames"] == frames and len(c.meta()["objects"]) == len(c.objects)


@pytest.mark.parametrize("frames", [0, 1, 4, 6, 16, 18])
def test_frame_counts_other_than_4k_plus_1_are_refused(frames):
    with pytest.raises(ValueError, match=r"4k \+ 1"):
        render_clip(0, frames=frames)


def test_object_count_is_checked_and_followed():
    for n in (1, 2, 3):
        assert len(render_clip(0, frames=5, n_objects=n).objects) == n
    with pytest.raises(ValueError, match="n_objects"):
        render_clip(0, n_objects=4)


@pytest.mark.parametrize("seed", SEEDS)
def test_labels_agree_in_every_frame(seed):
    c = render_clip(seed, frames=9)
    assert np.array_equal(c.saliency > 0, c.seg > 0) and set(np.unique(c.saliency)) <= {0, 255}
    top, bg = slice(0, c.horizon), c.seg == 0
    assert np.all(c.depth[:, top][bg[:, top]] == WALL_DEPTH)  # the wall is the far constant
    assert np.all(c.depth > 0) and c.depth.max() <= WALL_DEPTH
    for i in range(len(c.frames)):
        poses = c.pose(i)
        marks = np.stack([_footprint(c, p) for p in poses])  # (N, 64, 64)
        depths = np.array([p.depth for p in poses], np.float32)
        covered = marks.any(0)
        assert np.array_equal(covered, c.seg[i] > 0)
        # every object pixel sits at the nearest covering object's contact depth and carries a nearest one's class
        nearest = np.where(marks, depths[:, None, None], np.inf).min(0)  # (64, 64)
        assert np.array_equal(c.depth[i][covered], nearest[covered])
        ids = np.array([p.class_id for p in poses])[:, None, None]
        assert np.all((marks & (depths[:, None, None] == nearest) & (ids == c.seg[i])).any(0)[covered])
        for p in poses:  # on the floor, in the image, and its size word stays true
            assert p.bottom - p.side + 1 >= 0 and c.horizon < p.bottom < SIZE
            assert EDGE_CUT * p.side <= p.cx <= SIZE - EDGE_CUT * p.side
            assert SIZES[p.size][0] <= p.side <= SIZES[p.size][1]
    # the first and last frames show every object at least MIN_VISIBLE and name exactly its classes
    for i in (0, len(c.frames) - 1):
        cover = np.zeros((SIZE, SIZE), bool)
        for p in reversed(c.pose(i)):  # near to far
            full = _footprint(c, p)
            assert (full & ~cover).sum() >= MIN_VISIBLE * full.sum()
            cover |= full
        assert {CLASSES[k] for k in np.unique(c.seg[i]) if k} == {m.start.shape for m in c.objects}


def test_the_first_frame_is_the_image_worlds_scene():
    for seed in range(30):
        c, scene = render_clip(seed, frames=5), render_scene(seed)
        assert np.array_equal(c.seg[0], scene.seg) and np.array_equal(c.depth[0], scene.depth)
        assert c.pose(0) == scene.things and c.horizon == scene.horizon


@pytest.mark.parametrize("motion, sign", [("right", 1), ("left", -1)])
def test_sideways_motion_moves_the_mask_monotonically(motion, sign):
    c = _single(motion)
    assert video_caption_slots(c.caption)[c.objects[0].start.position][3] == motion
    xs = np.array([np.nonzero(s)[1].mean() for s in c.seg])  # (F,) mask centroid columns
    assert np.all(sign * np.diff(xs) >= 0) and sign * (xs[-1] - xs[0]) >= 8
    assert len({p.side for i in range(len(c.frames)) for p in c.pose(i)}) == 1  # no change of size


@pytest.mark.parametrize("motion, sign", [("closer", 1), ("away", -1)])
def test_depth_motion_follows_the_pinhole_camera(motion, sign):
    c = _single(motion)
    assert video_caption_slots(c.caption)[c.objects[0].start.position][3] == motion
    rows = [np.nonzero(s)[0] for s in c.seg]
    tall = np.array([r.max() - r.min() for r in rows])  # (F,) apparent height (areas of rasterised shapes wobble)
    low = np.array([r.max() for r in rows])  # contact row
    near = np.array([d[s > 0].max() for d, s in zip(c.depth, c.seg)])  # the object's depth
    assert np.all(sign * np.diff(tall) >= 0) and sign * (tall[-1] - tall[0]) > 0
    assert np.all(sign * np.diff(low) >= 0) and sign * (low[-1] - low[0]) > 0
    assert np.all(sign * np.diff(near) <= 0) and sign * (near[-1] - near[0]) < 0


def test_a_still_clip_is_static_and_does_not_flicker():
    c = _single("still")
    assert all(np.array_equal(f, c.frames[0]) for f in c.frames)
    assert label_flicker(c.seg) == 0.0
    assert label_flicker(_single("right").seg) > 0


def test_crossing_objects_occlude_nearer_over_farther():
    for seed in range(60):
        c = render_clip(seed, frames=9, n_objects=2)
        a, b = c.objects
        if a.start.shape == b.start.shape or (_footprint(c, a.start) & _footprint(c, b.start)).any():
            continue  # the classes must tell the objects apart, and they must meet by moving
        for i in range(1, len(c.frames)):
            far, near = c.pose(i)
            both = _footprint(c, far) & _footprint(c, near)
            if both.sum() >= 20 and near.depth < far.depth:
                assert np.all(c.seg[i][both] == near.class_id)
                assert np.all(c.depth[i][both] == np.float32(near.depth))
                return
    raise AssertionError("no two-object clip in seeds 0–59 has objects crossing")


def test_captions_read_back_every_object_and_use_only_the_vocabulary():
    vocab, seen = set(video_vocabulary()), set()
    for seed in range(20):
        c = render_clip(seed, frames=5)
        seen |= {m.motion for m in c.objects}
        assert video_caption_slots(c.caption) == {
            m.start.position: (m.start.shape, m.start.color, m.start.size, m.motion) for m in c.objects
        }
        words = c.caption.replace(",", " , ").split()
        assert set(words) <= vocab
        assert [w for w in words if w in SHAPES] == [m.start.shape for m in sorted(c.objects, key=lambda m: m.cx)]
    assert seen == set(MOTIONS)
    with pytest.raises(ValueError, match="motion"):
        video_caption_slots("a small red circle on the left")


def test_label_flicker_is_the_mean_changed_fraction_over_frame_pairs():
    seg = np.zeros((3, 2, 2), np.uint8)
    seg[1, 0, 0] = 1  # pair 0→1 changes 1 of 4 pixels, pair 1→2 changes it back
    seg[2, 1, :] = 2  # … and 2 more: 3 of 4
    assert label_flicker(seg) == pytest.approx((1 / 4 + 3 / 4) / 2)
    with pytest.raises(ValueError):
        label_flicker(seg[0])


def test_the_video_text_encoder_starts_as_the_image_toys_t5():
    """The recipe's UMT5 encoder, started from the shipped image toy's T5, computes the same features for a caption
    without motion words; the motion words keep rows of their own."""
    import torch
    from transformers import PreTrainedTokenizerFast, T5EncoderModel

    from mmdiff_gen.backbones.loading import BUILTIN_FOLDERS
    from mmdiff_gen.toy.train_video import init_text_from_image_toy
    from mmdiff_gen.toy.video_recipe import VideoToyRecipe

    pipe = VideoToyRecipe().build_pipeline()
    src = BUILTIN_FOLDERS["toy"]
    t5 = T5EncoderModel.from_pretrained(src / "text_encoder_2").eval()
    tok = PreTrainedTokenizerFast.from_pretrained(src / "tokenizer_2")
    assert init_text_from_image_toy(pipe) == len(tok.get_vocab())
    caption = "a large red circle on the left and a small blue star on the right"
    with torch.no_grad():
        ours = pipe.text_encoder(**pipe.tokenizer(caption, return_tensors="pt")).last_hidden_state
        image = t5(**tok(caption, return_tensors="pt")).last_hidden_state
    torch.testing.assert_close(ours, image, atol=1e-6, rtol=1e-6)
    own = set(pipe.tokenizer.get_vocab()) - set(tok.get_vocab())
    assert {"moving", "closer", "away", "still"} <= own  # the motion words: rows the flow loss trains from scratch


def test_the_class_map_target_follows_the_latent_frames_and_the_token_order():
    """The transformer's auxiliary target: latent frame 0 is frame 0's class map, latent frame j the mean of frames
    4j − 3 … 4j; tokens frame-major, then rows, then columns, each with its 2×2 cells."""
    import torch

    from mmdiff_gen.toy.train_video import class_map_tokens

    seg = torch.zeros(1, 9, 64, 64, dtype=torch.uint8)
    seg[0, 0, :8, 56:] = 2  # frame 0: the top-right token (row 0, column 7) is square
    seg[0, 1:3, 60:, :4] = 3  # frames 1–2 of latent frame 1's four: the bottom-left token's lower-left cell
    target = class_map_tokens(seg, 3, 16, 16, 4)  # (B, 3·8·8, classes, 4)
    assert target.shape == (1, 192, len(CLASSES), 4)
    torch.testing.assert_close(target.sum(2), torch.ones(1, 192, 4))
    assert torch.equal(target[0, 7, 2], torch.ones(4)) and target[0, 64 + 7, 2].sum() == 0
    bottom_left = 64 + 7 * 8  # latent frame 1, row 7, column 0
    assert torch.allclose(target[0, bottom_left, 3], torch.tensor([0.0, 0.0, 0.5, 0.0]))
    assert target[0, 128:, 3].sum() == 0 and target[0, :64, 3].sum() == 0
