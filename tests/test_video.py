"""Clips end to end on the tiny WanPipeline: heads per latent frame (and frame mixing), labels spread over the decoded
frames, `generate` writing KEY.mp4 with per-frame labels, read back by our reader and a plain webdataset one,
`verify`, `preview` (sheet + GIF) and the YouTube-VIS export with tracked instances."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from _helpers import make_heads
from mmdiff_gen.backbones import load_backbone
from mmdiff_gen.cli import app
from mmdiff_gen.heads.frames import latent_centres, to_frames
from mmdiff_gen.heads.model import HeadConfig, MMDiffHead
from mmdiff_gen.io.youtube_vis import track_instances

run = CliRunner().invoke
FAST = ["--model", "tiny-random-wan", "--size", "64", "--frames", "9", "--steps", "12", "--device", "cpu",
        "--dtype", "float32"]


def test_latent_frames_spread_over_the_decoded_frames():
    # Wan's VAE: latent 0 holds frame 0, latent j ≥ 1 frames 4j − 3 … 4j (centre 4j − 1.5).
    assert latent_centres(3, 9).tolist() == [0.0, 2.5, 6.5] and latent_centres(1, 1).tolist() == [0.0]
    x = torch.tensor([[0.0, 10.0, 20.0]])
    assert to_frames(x, 9)[0].tolist() == [0.0, 4.0, 8.0, 11.25, 13.75, 16.25, 18.75, 20.0, 20.0]
    with pytest.raises(ValueError, match="whole temporal factor"):
        latent_centres(3, 8)


def test_a_clip_head_reads_each_latent_frame_as_an_image_and_frame_mixing_starts_as_the_identity():
    torch.manual_seed(0)
    cfg = HeadConfig(tasks="seg", feature_dim=24, num_layers=2, num_timesteps=4, num_concepts=2, num_classes=3,
                     dim=16, decoder_channels=16)
    head = MMDiffHead(cfg).eval()
    feats, concepts = torch.randn(2, 2, 4, 3 * 16, 24), torch.rand(2, 2, 3, 4, 4)  # 3 latent frames of 4×4 tokens
    out = head(feats, (3, 4, 4), (16, 16), concepts=concepts)["seg"]
    assert out.shape == (2, 3, 3, 16, 16)
    frame1 = head(feats.unflatten(3, (3, 16))[:, :, :, 1], (4, 4), (16, 16), concepts=concepts[:, :, 1])["seg"]
    torch.testing.assert_close(out[:, 1], frame1)
    mixed = MMDiffHead(HeadConfig(**{**cfg.to_dict(), "frame_mixing": 3})).eval()
    mixed.load_state_dict(head.state_dict(), strict=False)  # its mixing starts at zero
    torch.testing.assert_close(mixed(feats, (3, 4, 4), (16, 16), concepts=concepts)["seg"], out)
    with pytest.raises(ValueError, match="odd kernel"):
        HeadConfig(**{**cfg.to_dict(), "frame_mixing": 2})


def test_a_head_with_frame_mixing_trains_on_real_video_features():
    """Real-video mode on toy clips, their exact segmentation as targets: the loss falls, and the mixing learns."""
    from mmdiff_gen.capture import CaptureSpec, extract
    from mmdiff_gen.toy.video_world import render_clip
    from mmdiff_gen.toy.world import CLASSES

    bb = load_backbone("tiny-random-wan", dtype=torch.float32, device="cpu")
    clips = [render_clip(seed, frames=9) for seed in range(4)]
    video = torch.from_numpy(np.stack([c.frames for c in clips])).permute(0, 1, 4, 2, 3).float() / 255
    cap = extract(bb, video, CaptureSpec(layers=(1, 3), store_dtype="float32"), captions=[c.caption for c in clips])
    target = torch.from_numpy(np.stack([c.seg for c in clips])).long()  # (B, F, 64, 64)
    torch.manual_seed(0)
    head = MMDiffHead(HeadConfig(tasks="seg", feature_dim=bb.feature_dim, num_layers=2, num_timesteps=4,
                                 num_classes=len(CLASSES), dim=16, decoder_channels=16, frame_mixing=3))
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        logits = to_frames(head(cap.features, cap.grid, (64, 64))["seg"], cap.frames)  # (B, F, K, H, W)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(0, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
    assert head.mixing[0].proj.weight.abs().sum() > 0


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    make_heads(load_backbone("tiny-random-wan", dtype=torch.float32, device="cpu"), root / "heads")
    (root / "p.txt").write_text("a red circle on the left\na small blue star\n")
    res = run(app, ["generate", "--prompts", str(root / "p.txt"), "--heads", str(root / "heads"), "-n", "2",
                    "--shard-size", "2", "--out", str(root / "ds"), *FAST])
    assert res.exit_code == 0, res.output
    return root


def test_generate_writes_clips_that_our_reader_and_webdataset_read(clips):
    import webdataset as wds

    from mmdiff_gen.io.dataset import GeneratedDataset

    info = json.loads((clips / "ds" / "dataset.json").read_text())
    assert info["image_format"] == "mp4" and info["members"] == ["mp4", "txt", "json", "seg.npz", "sal.npz",
                                                                  "depth.npz"]
    assert info["sampling"]["num_frames"] == 9 and "npz" in info["depth"]["encoding"]
    samples = list(GeneratedDataset(clips / "ds"))
    assert len(samples) == 4
    s = samples[0]
    assert s.image.shape == (9, 64, 64, 3) and s.meta["frames"] == 9 and s.meta["fps"] == 16
    assert {t: v.shape for t, v in s.labels.items()} == {t: (9, 64, 64) for t in ("seg", "saliency", "depth")}
    assert s.labels["depth"].dtype == np.float32 and s.labels["seg"].dtype == np.uint8
    plain = next(iter(wds.WebDataset(str(clips / "ds" / "00000.tar"), shardshuffle=False).decode()))
    assert plain["mp4"] == s.image_bytes and plain["json"]["frames"] == 9
    assert np.array_equal(plain["seg.npz"]["labels"], s.labels["seg"])
    assert run(app, ["verify", str(clips / "ds")]).exit_code == 0


def test_preview_draws_frames_and_an_animation(clips):
    res = run(app, ["preview", str(clips / "ds"), "--out", str(clips / "sheet.png"), "-n", "2"])
    assert res.exit_code == 0 and "sheet.gif" in res.output, res.output
    gif = Image.open(clips / "sheet.gif")
    assert gif.n_frames == 9 and gif.size == (4 * 128, 2 * 128)
    assert Image.open(clips / "sheet.png").size[1] > 2 * 5 * 128  # 5 frames per clip


def test_youtube_vis_export_and_coco_refused(clips):
    from pycocotools import mask as mask_utils

    from mmdiff_gen.io.dataset import GeneratedDataset

    res = run(app, ["export", "--format", "coco", "--in", str(clips / "ds"), "--out", str(clips / "coco")])
    assert res.exit_code != 0 and "--format youtube-vis" in res.output
    res = run(app, ["export", "--format", "youtube-vis", "--in", str(clips / "ds"), "--out", str(clips / "vis")])
    assert res.exit_code == 0, res.output
    doc = json.loads((clips / "vis" / "instances.json").read_text())
    assert len(doc["videos"]) == 4 and all(v["length"] == 9 and len(v["file_names"]) == 9 for v in doc["videos"])
    assert (clips / "vis" / "JPEGImages" / doc["videos"][0]["file_names"][8]).is_file()
    seg = next(iter(GeneratedDataset(clips / "ds"))).labels["seg"]
    for ann in (a for a in doc["annotations"] if a["video_id"] == 1):  # every mask is its class's pixels there
        for f, rle in enumerate(ann["segmentations"]):
            if rle is not None:
                m = mask_utils.decode(rle).astype(bool)
                assert m.any() and np.all(seg[f][m] == ann["category_id"])


def test_instances_are_tracked_by_class_and_overlap():
    seg = np.zeros((5, 16, 16), np.uint8)
    for f in range(5):
        seg[f, 2:6, 1 + 2 * f : 5 + 2 * f] = 1  # a square moving right, overlapping itself frame to frame
    seg[:2, 10:14, 10:14] = 2  # a still object of another class that vanishes after frame 1 …
    seg[4, 10:14, 10:14] = 2  # … and comes back: a new instance (nothing in the labels says it is the same)
    seg[3, 12:14, 0:2] = 1  # a second class-1 object, one frame only
    tracks = track_instances(seg, {1, 2})
    assert [(t["category_id"], sorted(t["masks"])) for t in tracks] == [(1, [0, 1, 2, 3, 4]), (2, [0, 1]), (1, [3]),
                                                                        (2, [4])]
    assert all(np.array_equal(tracks[0]["masks"][f], seg[f] == 1) for f in (0, 1, 2, 4))


def test_toy_video_recipe_heads_eval_and_probe_run(tmp_path):
    """The toy video commands in smoke mode: the recipe writes a WanPipeline folder that loads, its heads train and
    score held-out clips, the evaluation and the Fig. 5 probe run on it (figures of random-ish weights: shapes only)."""
    from mmdiff_gen.backbones import WanBackbone
    from mmdiff_gen.toy.video_eval import run_video_eval, run_video_probe
    from mmdiff_gen.toy.video_heads import train_video_heads

    small = tmp_path / "recipe.json"  # the recipe's architecture, narrower: seconds on a CPU
    small.write_text(json.dumps({"vae_dims": [8, 8, 8], "blocks": 4, "heads": 2, "vae_batch": 2, "dit_batch": 2}))
    res = run(app, ["toy", "train-video", "--work", str(tmp_path / "work"), "--steps", "2", "--clips", "8",
                    "--out", str(tmp_path / "toy_video"), "--recipe", str(small)])
    assert res.exit_code == 0, res.output
    bb = load_backbone(str(tmp_path / "toy_video"), dtype=torch.float32, device="cpu")
    assert isinstance(bb, WanBackbone) and bb.sampling_kwargs()["num_frames"] == 9 and bb.token_grid(64, 64, 9) == (3, 8, 8)
    metrics = train_video_heads(bb, tmp_path / "heads", clips=4, held_out=2, steps=2, batch=2)
    assert set(metrics) == {"seg", "saliency", "depth", "flicker", "held_out", "train"}
    assert (tmp_path / "heads" / "unified.safetensors").is_file() and metrics["flicker"]["exact"] > 0
    result = run_video_eval(str(tmp_path / "toy_video"), tmp_path / "heads", n=2, batch_size=2, num_inference_steps=4)
    assert 0 <= result["fidelity"]["generated"]["both"] <= 1 and result["fidelity"]["ceiling_renders"]["layout"] == 1
    assert set(result["flicker"]) == {"video_heads", "per_frame_baseline", "oracle", "exact_on_renders"}
    probe = run_video_probe(str(tmp_path / "toy_video"), n=2, sigmas=(0.52,), batch_size=2)
    assert np.array(probe["miou"]).shape == (4, 1, 4)  # blocks × sigmas × thresholds
