"""The real FLUX.1-dev config, built on the meta device: block indices, geometry and feature shapes."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import FluxTransformer2DModel

from mmdiff_gen.backbones import FluxBackbone
from mmdiff_gen.backbones.flux import FLUX_DEV
from mmdiff_gen.capture import Capture, CaptureSpec

@pytest.fixture(scope="module")
def flux_dev():
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**FLUX_DEV)
    # FLUX.1-dev's VAE has 4 block widths: scale factor 8.
    return FluxBackbone(SimpleNamespace(transformer=transformer, vae_scale_factor=8), name="FLUX.1-dev")


def test_flux_dev_defaults(flux_dev):
    assert len(flux_dev.feature_blocks) == 38 and len(flux_dev.joint_blocks) == 19
    assert flux_dev.default_layers() == (4, 15, 26, 37)  # MMDiff §3.4
    assert flux_dev.default_concept_layers() == (15, 16, 17, 18)  # ConceptAttention's FLUX default
    assert flux_dev.feature_dim == 3072
    assert flux_dev.pixels_per_token == 16
    assert flux_dev.token_grid(512, 512) == (32, 32)
    assert flux_dev.token_grid(1024, 768) == (64, 48)
    with pytest.raises(ValueError, match="multiples of 16"):
        flux_dev.token_grid(500, 512)


@pytest.mark.parametrize("size, tokens", [(512, 1024), (1024, 4096)])
def test_flux_dev_feature_shapes(flux_dev, size, tokens):
    b = 2
    spec = CaptureSpec(sigmas=(0.5,))
    h, w = flux_dev.token_grid(size, size)
    with Capture(flux_dev, spec, batch_size=b, height=size, width=size, planned=True) as cap, torch.device("meta"):
        assert cap.arm([0.5] * b)
        flux_dev.transformer(
            hidden_states=torch.randn(b, h * w, 64), encoder_hidden_states=torch.randn(b, 512, 4096),
            pooled_projections=torch.randn(b, 768), timestep=torch.rand(b), guidance=torch.rand(b),
            img_ids=torch.zeros(h * w, 3), txt_ids=torch.zeros(512, 3), return_dict=False,
        )
        cap.collect()
    assert cap.features.shape == (b, 4, 1, tokens, 3072)
    assert cap.features.dtype == torch.bfloat16
