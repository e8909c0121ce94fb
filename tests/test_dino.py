"""Optional DINOv3 features (MMDiff §3.3) on a tiny random DINOv3 config: maps, cache, heads, generation."""

import numpy as np
import pytest
import torch
from transformers import DINOv3ViTConfig, DINOv3ViTModel

from mmdiff_gen.backbones.dino import DinoFeatures
from mmdiff_gen.capture import CaptureSpec
from mmdiff_gen.heads.checkpoint import HeadMismatch, load_head
from mmdiff_gen.io.readers import FilesDataset
from mmdiff_gen.jobs.annotate import Annotator, head_files
from mmdiff_gen.toy.render import write_scenes
from mmdiff_gen.toy.world import CLASSES
from mmdiff_gen.train.feature_cache import FeatureCache, build_cache
from mmdiff_gen.train.trainer import TrainConfig, train_head


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dinov3")
    torch.manual_seed(0)
    cfg = DINOv3ViTConfig(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
                          patch_size=8, image_size=64, num_register_tokens=2)
    DINOv3ViTModel(cfg).save_pretrained(folder)
    return folder


def test_maps_are_normed_patch_tokens_on_the_token_grid(dino_dir):
    dino = DinoFeatures.load(dino_dir)
    assert dino.layers == (0, 2) and dino.channels == 32  # one early layer and the last; 16 × 2 channels
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    maps = dino(images, (8, 8))
    assert maps.shape == (2, 32, 8, 8)
    # By hand: the ViT at 8×8 patches of 8 px; the last layer's tokens after CLS + 2 registers, normed.
    x = (images - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    out = dino.model(x, output_hidden_states=True)
    last = out.last_hidden_state[:, 3:].transpose(1, 2).reshape(2, 16, 8, 8)
    torch.testing.assert_close(maps[:, 16:], last, atol=1e-5, rtol=1e-5)
    # Another grid resizes the image, not the maps; the identity records what a head must meet again.
    assert dino(images, (4, 4)).shape == (2, 32, 4, 4)
    ident = dino.identity()
    assert ident["layers"] == [0, 2] and ident["weights"] and DinoFeatures.load(dino_dir).identity() == ident
    with pytest.raises(ValueError, match="layers"):
        DinoFeatures.load(dino_dir, layers=(1, 2)).check(ident, "the head")
    with pytest.raises(FileNotFoundError, match="no DINOv3 model"):
        DinoFeatures.load(dino_dir / "missing")


def test_heads_read_dino_maps_from_cache_to_generation(tiny, dino_dir, tmp_path):
    dino = DinoFeatures.load(dino_dir)
    write_scenes(tmp_path / "scenes", 4, seed=0)
    build_cache(tiny, FilesDataset(tmp_path / "scenes"), CaptureSpec.for_tasks(["seg"]), tmp_path / "cache",
                batch_size=2, dino=dino)
    cache = FeatureCache(tmp_path / "cache")
    assert cache.manifest["dino"] == dino.identity()
    assert next(cache.batches(4))["dino"].shape == (4, 32, 8, 8)
    cfg = TrainConfig(tasks="seg", epochs=1, batch_size=2, dino=True, head=(("dim", 16), ("decoder_channels", 16)))
    metrics = train_head(cache, cfg, tmp_path / "heads" / "seg.safetensors", classes=list(CLASSES), eval_cache=cache)
    assert np.isfinite(metrics["miou"])
    model, meta = load_head(tmp_path / "heads" / "seg.safetensors")
    assert model.config.extra_channels == 32 and meta.dino == dino.identity()

    files = head_files(tmp_path / "heads", ["seg"])
    with pytest.raises(HeadMismatch, match="pass --dino"):
        Annotator(files, tiny.identity())
    from typer.testing import CliRunner

    from mmdiff_gen.cli import app

    (tmp_path / "p.txt").write_text("a large red circle on the left\n")
    res = CliRunner().invoke(app, ["generate", "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "ds"),
                                   "--model", "tiny-random", "--heads", str(tmp_path / "heads"), "--tasks", "seg",
                                   "--dino", str(dino_dir), "--steps", "4", "--size", "64", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "1 samples written" in res.output
