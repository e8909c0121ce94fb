"""Heads: shapes and gradient flow through every module, initial values, mixing weights."""

import pytest
import torch

from mmdiff_gen.heads.aggregation import TokenAggregation
from mmdiff_gen.heads.cbam import CBAM
from mmdiff_gen.heads.deeplab import DeepLabV3PlusDecoder
from mmdiff_gen.heads.dpt import DPTDecoder
from mmdiff_gen.heads.model import HeadConfig, MMDiffHead

B, L, T, H, W, C = 2, 4, 4, 4, 6, 64


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _grads_everywhere(module: torch.nn.Module, loss: torch.Tensor) -> None:
    loss.backward()
    missing = [n for n, p in module.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing, missing


def test_token_aggregation_shapes_init_and_weights():
    agg = TokenAggregation(C, 16, T, heads=8)
    assert agg.skip_gate.item() == pytest.approx(0.1)
    assert all(torch.allclose(b.ls1.gamma, torch.full((16,), 1e-4)) for b in agg.blocks)
    assert len(agg.blocks) == 3 and agg.blocks[0].attn.heads == 8
    feats = torch.randn(B, T, H * W, C) * 50  # massive activations are normalised per timestep
    out = agg(feats, (H, W))
    assert out.shape == (B, 16, H, W)
    w = agg.last_weights
    assert w.shape == (B, T, H, W) and torch.allclose(w.sum(1), torch.ones(B, H, W)) and (w >= 0).all()
    _grads_everywhere(agg, out.square().mean())


def test_temporal_attention_in_chunks_equals_one_call(monkeypatch):
    """More sequences than CUDA's fused kernels take in one grid (FLUX 1024², batch 16) run in chunks: same result."""
    from mmdiff_gen.heads import aggregation

    attn = aggregation.TemporalAttention(16, 4, 0.0)
    x = torch.randn(10, T, 16)
    whole = attn(x)
    monkeypatch.setattr(aggregation, "SDPA_MAX_BATCH", 3)
    assert torch.allclose(attn(x), whole, atol=1e-6)


def test_token_aggregation_rejects_wrong_shapes():
    agg = TokenAggregation(C, 16, T)
    with pytest.raises(ValueError):
        agg(torch.randn(B, T, H * W + 1, C), (H, W))
    with pytest.raises(ValueError):
        TokenAggregation(C, 15, T, heads=8)


def test_cbam_and_decoders():
    x = torch.randn(B, 16, H, W, requires_grad=True)
    assert CBAM(16)(x).shape == x.shape
    maps = [torch.randn(B, 16, H, W) for _ in range(L)]
    side = torch.rand(B, 3, H, W)
    dl = DeepLabV3PlusDecoder([16] * L, 3, 7, channels=32, aspp_rates=(1, 2))
    out = dl(maps, side, (32, 48))
    assert out.shape == (B, 7, 32, 48)
    _grads_everywhere(dl, out.square().mean())
    for tail in ("positive", "probability"):
        dpt = DPTDecoder([16] * L, 3, tail, channels=32)
        out = dpt(maps, side, (32, 48))
        assert out.shape == (B, 1, 32, 48)
        if tail == "positive":
            assert (out >= 0).all()
        _grads_everywhere(dpt, out.square().mean())


@pytest.mark.parametrize("task, classes", [("seg", 7), ("saliency", 1), ("depth", 1)])
@pytest.mark.parametrize("fusion, t", [("learned", T), ("mean", T), ("mean", 1)])
def test_head_end_to_end(task, classes, fusion, t):
    cfg = HeadConfig(tasks=task, feature_dim=C, num_layers=L, num_timesteps=t, num_concepts=4, num_classes=classes,
                     dim=16, decoder_channels=32, aspp_rates=(1, 2), fusion=fusion)
    head = MMDiffHead(cfg)
    feats = torch.randn(B, L, t, H * W, C).bfloat16()
    out = head(feats, (H, W), (32, 48), concepts=torch.rand(B, 4, H, W))[task]
    assert out.shape == (B, classes, 32, 48)
    _grads_everywhere(head, out.square().mean())
    with pytest.raises(ValueError, match="concept maps"):
        head(feats, (H, W), (32, 48))


def test_single_timestep_learned_fusion_is_refused():
    with pytest.raises(ValueError, match="nothing to fuse"):
        HeadConfig(tasks="seg", feature_dim=C, num_layers=L, num_timesteps=1)


def test_flux_scale_parameter_counts():
    # MMDiff §3.4 reports ~36 M trainable parameters for its heads at FLUX.1-dev widths (3072 → 768).
    def count(task, k, shared):
        head = MMDiffHead(HeadConfig(tasks=task, feature_dim=3072, num_layers=4, num_timesteps=4, num_concepts=5,
                                     num_classes=k, shared_aggregation=shared))
        agg = sum(p.numel() for p in head.aggregators.parameters())
        return agg, sum(p.numel() for p in head.decoders[task].parameters())

    agg_one, dec_seg = count("seg", 21, True)
    agg_four, dec_dpt = count("depth", 1, False)
    assert agg_four == 4 * agg_one
    assert 25e6 < agg_one < 35e6  # one aggregation module: per-timestep projections + 3-layer transformer
    assert dec_seg < 10e6 and dec_dpt < 15e6  # decoders are light
    assert 30e6 < agg_one + dec_seg < 45e6  # the shared variant matches the paper's ~36 M


def test_checkpoint_round_trip_and_mismatch(tmp_path):
    from mmdiff_gen.heads.checkpoint import HeadMeta, HeadMismatch, load_head, save_head

    cfg = HeadConfig(tasks="seg", feature_dim=C, num_layers=L, num_timesteps=T, num_concepts=4, num_classes=7, dim=16,
                     decoder_channels=32, aspp_rates=(1, 2))
    head = MMDiffHead(cfg).eval()
    ident = {"family": "flux", "name": "toy", "config_sha256": "abc"}
    meta = HeadMeta(config=cfg, backbone=ident, layers=[1, 3, 5, 7], sigmas=[0.78, 0.52, 0.26, 0.001],
                    concepts=["object", "background", "detail", "edges"], classes=list("abcdefg"),
                    palette=[[0, 0, 0]] * 7, metrics={"miou": 12.5})
    save_head(tmp_path / "seg.safetensors", head, meta)
    again, meta2 = load_head(tmp_path / "seg.safetensors", backbone=ident)
    assert meta2.config == cfg and meta2.metrics == {"miou": 12.5} and meta2.layers == [1, 3, 5, 7]
    feats, concepts = torch.randn(1, L, T, H * W, C), torch.rand(1, 4, H, W)
    assert torch.equal(head(feats, (H, W), (8, 12), concepts)["seg"], again(feats, (H, W), (8, 12), concepts)["seg"])
    with pytest.raises(HeadMismatch, match="trained on 'toy'"):
        load_head(tmp_path / "seg.safetensors", backbone={**ident, "name": "FLUX.1-dev", "config_sha256": "def"})


def test_checkpoint_refuses_retrained_weights(tmp_path):
    from mmdiff_gen.heads.checkpoint import HeadMeta, HeadMismatch

    cfg = HeadConfig(tasks="depth", feature_dim=C, num_layers=L, num_timesteps=T)
    meta = HeadMeta(config=cfg, backbone={"family": "flux", "name": "toy", "config_sha256": "abc", "weights": "w1"},
                    layers=[0], sigmas=[0.5], concepts=[], classes=["depth"])
    meta.check_backbone({"family": "flux", "name": "toy", "config_sha256": "abc", "weights": "w1"})
    with pytest.raises(HeadMismatch, match="other weights"):
        meta.check_backbone({"family": "flux", "name": "toy", "config_sha256": "abc", "weights": "w2"})


def test_head_precision_bf16_autocast_and_refusals():
    from mmdiff_gen.heads.model import bf16_heads, head_precision, predictions

    head = MMDiffHead(HeadConfig(tasks="seg", feature_dim=C, num_layers=L, num_timesteps=T, num_concepts=0,
                                 num_classes=5, dim=16, decoder_channels=16)).eval()
    feats = torch.randn(B, L, T, H * W, C)
    with torch.no_grad():
        with head_precision("cpu", "auto"):  # float32 on a CPU
            ref = head(feats, (H, W), (16, 24))["seg"]
        with head_precision("cpu", "bf16"):
            low = head(feats, (H, W), (16, 24))["seg"]
    assert ref.dtype == torch.float32 and low.dtype == torch.bfloat16
    assert (predictions("seg", low) == predictions("seg", ref)).float().mean() > 0.9
    assert bf16_heads("cuda", "auto") and not bf16_heads("cuda", "fp32") and not bf16_heads("cpu", "auto")
    with pytest.raises(ValueError, match="precision must be one of"):
        head_precision("cpu", "fp8")
