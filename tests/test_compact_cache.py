"""8-bit feature caches and training without a cache (features extracted batch by batch), on the tiny backbone."""

import pytest
import torch
from typer.testing import CliRunner

from mmdiff_gen.capture import CaptureSpec
from mmdiff_gen.cli import app
from mmdiff_gen.heads.checkpoint import read_meta
from mmdiff_gen.io.readers import FilesDataset
from mmdiff_gen.toy.render import write_scenes
from mmdiff_gen.toy.world import CLASSES
from mmdiff_gen.train.feature_cache import FeatureCache, LiveFeatures, build_cache
from mmdiff_gen.train.feature_codec import decode, encode
from mmdiff_gen.train.trainer import TrainConfig, train_head

SPEC = CaptureSpec(concepts=("object", "background"))
HEAD = (("dim", 16), ("decoder_channels", 16))


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("compact")
    write_scenes(root / "scenes", 6, seed=0)
    return root


@pytest.mark.parametrize("codec, bound", [("int8", 0.5 / 127), ("fp8", 2.0**-4)])
@pytest.mark.parametrize("per", ["token", "channel"])
def test_codec_round_trip_error_bound(codec, bound, per):
    # One outlier channel 100× the rest, as DiT features have: every value comes back within the code's step.
    x = torch.randn(2, 3, 16, 32)
    x[..., 5] *= 100
    enc = encode(x.to(torch.bfloat16), codec, per)
    assert enc["features"].element_size() == 1 and enc["features_scale"].dtype == torch.float32
    y = decode(dict(enc), torch.float32)["features"]
    xb = x.to(torch.bfloat16).float()
    axis = -1 if per == "token" else -2
    absmax = xb.abs().amax(axis, keepdim=True)
    # int8: half a step of absmax / 127; fp8 e4m3: half a unit in the last place (2^-4 relative) above its
    # subnormal range, whose step is absmax / 448 · 2^-9.
    err = (y - xb).abs()
    limit = bound * absmax * (1 + 1e-3) if codec == "int8" else torch.maximum(
        bound * xb.abs(), absmax / 448 * 2.0**-10) * (1 + 1e-3)
    assert (err <= limit).all()
    assert encode(torch.zeros(4, 8), codec, per)["features"].float().abs().sum() == 0  # all-zero tokens stay zero


def test_int8_cache_halves_disk_and_reads_back(tiny, scenes, tmp_path):
    ds = FilesDataset(scenes / "scenes")
    full = FeatureCache(build_cache(tiny, ds, SPEC, tmp_path / "bf16", batch_size=3))
    small = FeatureCache(build_cache(tiny, ds, SPEC, tmp_path / "int8", batch_size=3, codec="int8"))
    assert small.manifest["codec"] == "int8" and small.record["codec"] == "int8"
    # Features are 1 byte instead of 2, plus 4 bytes of scale per token (width 32 here: 12.5% overhead).
    l, t, n, c = 4, 4, 64, tiny.feature_dim
    assert full.manifest["bytes_per_sample"] - small.manifest["bytes_per_sample"] == l * t * n * (c - 4)
    a, b = next(full.batches(6)), next(small.batches(6))
    assert b["features"].dtype == torch.bfloat16 and "features_scale" not in b
    rel = (a["features"].float() - b["features"].float()).norm() / a["features"].float().norm()
    assert 0 < rel < 0.01
    torch.testing.assert_close(a["concept_maps"], b["concept_maps"])
    # Another codec in the same folder is another cache: refused.
    with pytest.raises(ValueError, match="other data or settings"):
        build_cache(tiny, ds, SPEC, tmp_path / "int8", codec="fp8")


def test_live_features_equal_a_cache(tiny, scenes, tmp_path):
    ds = FilesDataset(scenes / "scenes")
    cache = FeatureCache(build_cache(tiny, ds, SPEC, tmp_path / "one", batch_size=6, seed=3))
    live = LiveFeatures(tiny, ds, SPEC, source="scenes", seed=3, extract_batch_size=2)
    assert (live.grid, live.layers, len(live), live.manifest["labels"]) == (
        cache.grid, cache.layers, len(cache), cache.manifest["labels"])
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    for x, y in zip(cache.batches(4, shuffle=True, generator=gen()), live.batches(4, shuffle=True, generator=gen())):
        assert x["index"].tolist() == y["index"].tolist()  # the same order
        torch.testing.assert_close(x["features"].float(), y["features"].float(), atol=2e-2, rtol=2e-2)
        assert torch.equal(x["seg"], y["seg"])
    cfg = TrainConfig(tasks="seg", epochs=1, batch_size=3, head=HEAD)
    metrics = train_head(live, cfg, tmp_path / "heads" / "seg.safetensors", classes=list(CLASSES), eval_cache=live)
    assert 0 <= metrics["miou"] <= 100
    assert read_meta(tmp_path / "heads" / "seg.safetensors").metrics["train"]["data"] == "scenes"


def test_cli_train_no_cache_and_codec(scenes, tmp_path):
    runner = CliRunner()
    data = str(scenes / "scenes")
    common = ["train", "--model", "tiny-random", "--task", "sal", "--epochs", "1", "--batch-size", "3",
              "--decoder-channels", "16"]
    r = runner.invoke(app, [*common, "--data", data, "--no-cache", "--eval-data", data,
                            "--out", str(tmp_path / "live.safetensors")])
    assert r.exit_code == 0, r.output
    assert "max_f" in r.output and not any(tmp_path.glob("**/cache.json"))  # nothing cached
    r = runner.invoke(app, [*common, "--data", data, "--cache", str(tmp_path / "c8"), "--codec", "fp8",
                            "--out", str(tmp_path / "c8.safetensors")])
    assert r.exit_code == 0, r.output
    assert FeatureCache(tmp_path / "c8").manifest["codec"] == "fp8"
    for bad in (["--no-cache"], ["--no-cache", "--data", data, "--cache", str(tmp_path / "x")], []):
        r = runner.invoke(app, [*common, *bad, "--out", str(tmp_path / "bad.safetensors")])
        assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output


def test_cli_codecs_are_the_library_codecs():
    from mmdiff_gen.cli import _options
    from mmdiff_gen.train.feature_codec import CODECS, DEFAULT

    # the CLI names them without importing torch (--help stays fast)
    assert (_options.FEATURE_CODECS, _options.DEFAULT_CODEC) == (CODECS, DEFAULT)


def test_captions_are_part_of_a_cache(tiny, scenes, tmp_path):
    # Captions condition the features: a cache extracted with other captions is another cache, never reused.
    from mmdiff_gen.train.feature_cache import extract_dataset

    keys = FilesDataset(scenes / "scenes").keys
    caps = tmp_path / "caps.jsonl"
    caps.write_text("".join(f'{{"key": "{k}", "caption": "a red circle"}}\n' for k in keys))
    extract_dataset(tiny, str(scenes / "scenes"), tmp_path / "c", ["seg"], captions=caps, batch_size=6)
    assert FeatureCache(tmp_path / "c").manifest["captions_sha256"]
    extract_dataset(tiny, str(scenes / "scenes"), tmp_path / "c", ["seg"], captions=caps)  # the same: kept
    caps.write_text(caps.read_text().replace("red", "blue"))
    for other in (caps, None):
        with pytest.raises(ValueError, match="other data or settings"):
            extract_dataset(tiny, str(scenes / "scenes"), tmp_path / "c", ["seg"], captions=other)
