"""What only SD3 has, beyond the family contract (test_families.py): SD3-medium's blocks without q/k norms and the
last block's `context_pre_only` under the concept stream, guidance that is already CFG, the built-in short name, T5
counted as its third tokenizer."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import SD3Transformer2DModel

from _families import sd3_reference
from mmdiff_gen.backbones import SD3Backbone, load_backbone, wrap_pipeline
from mmdiff_gen.backbones.sd3 import SD35_LARGE
from mmdiff_gen.backbones.tiny import build_tiny_sd3
from mmdiff_gen.capture import CaptureSpec, generate
from mmdiff_gen.capture.concepts import concept_block_update

PROMPTS = ["a red circle on the left", "a small blue star"]
SEEDS = [3, 4]
KW = dict(height=64, width=64, num_inference_steps=10, max_sequence_length=16)


@pytest.fixture(scope="module", params=["sd3", "sd3.5"])
def sd3(request):
    """SD3-medium-like (no q/k norm) and SD3.5-like (RMS q/k norm, a dual-attention block)."""
    extra = {} if request.param == "sd3" else dict(qk_norm="rms_norm", dual_attention_layers=(0,))
    return wrap_pipeline(build_tiny_sd3(seed=0, **extra), name=f"tiny-{request.param}")


@torch.no_grad()
@pytest.mark.parametrize("which", [0, -1], ids=["joint", "last (context_pre_only)"])
def test_concept_block_matches_the_masked_reference(sd3, which):
    torch.manual_seed(0)
    block = sd3.joint_blocks[which]
    attn, dim = block.attn, sd3.feature_dim
    b, s, n, kk = 2, 5, 16, 3
    x, txt, c = torch.randn(b, n, dim), torch.randn(b, s, dim), torch.randn(b, kk, dim)
    temb, temb_c = torch.randn(b, dim), torch.randn(b, dim)
    ref = sd3_reference(block, dict(hidden_states=x, encoder_hidden_states=txt, temb=temb), c, temb_c)
    nx = block.norm1(x, emb=temb)[0]
    heads = lambda t: t.unflatten(-1, (attn.heads, -1))  # noqa: E731
    keys = heads(attn.to_k(nx))
    keys = keys if attn.norm_k is None else attn.norm_k(keys)
    c_ours, o_c = concept_block_update(block, c, temb_c, keys, heads(attn.to_v(nx)))
    torch.testing.assert_close(c_ours, ref["c"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(o_c, ref["o_c"], atol=1e-5, rtol=1e-5)
    # The stock block leaves text None after the last block and never sees the concepts.
    t_out, _ = block(hidden_states=x, encoder_hidden_states=txt, temb=temb)
    assert (t_out is None) == (which == -1)


def test_true_cfg_scale_is_refused(sd3):
    with pytest.raises(ValueError, match="already true classifier-free guidance"):
        generate(sd3, PROMPTS[:1], CaptureSpec(), seeds=[0], true_cfg_scale=4.0, **KW)


def test_the_built_in_short_name():
    assert load_backbone("tiny-random-sd3", dtype=torch.float32, device="cpu").identity()["family"] == "sd3"


def test_sd35_large_ends_in_a_context_pre_only_block():
    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**SD35_LARGE)
    bb = SD3Backbone(SimpleNamespace(transformer=transformer, vae_scale_factor=8), name="SD3.5-large")
    assert bb.feature_blocks is bb.joint_blocks and bb.transformer.transformer_blocks[-1].context_pre_only


def test_overlong_prompts_are_counted_in_t5_tokens(sd3):
    """SD3's second tokenizer is CLIP-G's: the backbone counts a prompt's length with its T5 tokenizer (the third)."""
    assert sd3.t5_tokenizer is sd3.pipe.tokenizer_3 and sd3.t5_tokenizer is not sd3.pipe.tokenizer_2
    t5 = sd3.pipe.tokenizer_3
    long_prompt = "a large red circle " * 40
    n = len(t5(long_prompt).input_ids)
    assert sd3.overlong_prompts(["a cat", long_prompt], n - 1) == [(1, n)]
    assert sd3.overlong_prompts(["a cat", long_prompt], n) == []
