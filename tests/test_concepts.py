"""Concept attention on FLUX.1: one block against the masked-attention reference (which the stock block's outputs
validate), map shapes, real-image batching, images untouched. Every family's maps through the transformer:
test_families.py."""

import numpy as np
import torch
from diffusers.models.embeddings import apply_rotary_emb

from _families import flux_reference
from mmdiff_gen.capture import CaptureSpec, extract, generate
from mmdiff_gen.capture.concepts import concept_block_update
from mmdiff_gen.tasks import get as get_task


@torch.no_grad()
def test_one_block_matches_the_masked_reference(tiny):
    torch.manual_seed(0)
    block = tiny.joint_blocks[0]
    c_dim = tiny.feature_dim
    b, s, n, kk = 2, 5, 16, 3
    x, txt, c = torch.randn(b, n, c_dim), torch.randn(b, s, c_dim), torch.randn(b, kk, c_dim)
    temb, temb_c = torch.randn(b, c_dim), torch.randn(b, c_dim)
    ids = torch.cat([torch.zeros(s, 3), tiny.image_ids(32, 32)])  # text positions 0, image grid 4×4
    rotary = tiny.transformer.pos_embed(ids)
    ref = flux_reference(block, dict(hidden_states=x, encoder_hidden_states=txt, temb=temb, image_rotary_emb=rotary),
                         c, temb_c)

    # The stock block ignores the concepts entirely: its outputs equal the reference's.
    t_stock, x_stock = block(hidden_states=x, encoder_hidden_states=txt, temb=temb, image_rotary_emb=rotary)
    torch.testing.assert_close(x_stock, ref["x"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t_stock, ref["t"], atol=1e-5, rtol=1e-5)

    # Our concept branch, from the image keys / values the stock block computes.
    attn = block.attn
    nx = block.norm1(x, emb=temb)[0]
    keys = attn.norm_k(attn.to_k(nx).unflatten(-1, (-1, attn.head_dim)))
    keys = apply_rotary_emb(keys, (rotary[0][s:], rotary[1][s:]), sequence_dim=1)
    values = attn.to_v(nx).unflatten(-1, (-1, attn.head_dim))
    c_ours, o_c = concept_block_update(block, c, temb_c, keys, values)
    torch.testing.assert_close(c_ours, ref["c"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(o_c, ref["o_c"], atol=1e-5, rtol=1e-5)


def test_concept_maps_shape_and_softmax(tiny):
    spec = CaptureSpec.for_tasks(["seg", "depth"], cross_attention=True)
    assert spec.concepts == get_task("seg").concepts + ("depth", "surface", "near", "far")
    gen = generate(tiny, ["a red circle"], spec, seeds=[3], height=64, width=64, num_inference_steps=8,
                   max_sequence_length=32)
    maps = gen.capture.concept_maps
    assert maps.shape == (1, 4, len(spec.concepts), 64)
    torch.testing.assert_close(maps.sum(2), torch.ones(1, 4, 64))
    assert gen.capture.mean_concept_maps().shape == (1, len(spec.concepts), 8, 8)
    cross = gen.capture.cross_attention
    assert cross.shape == (1, 4, 64) and torch.all(cross > 0) and torch.all(cross < 1)


def test_real_image_mode_matches_looped_forwards(tiny):
    spec = CaptureSpec(layers=(0, 3), store_dtype="float32", concepts=("object", "background"))
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    batched = extract(tiny, images, spec, captions=["a red circle", ""], seeds=[5, 6], max_sequence_length=32)
    assert batched.features.shape == (2, 2, 4, 64, tiny.feature_dim)
    assert torch.allclose(batched.sigmas, torch.tensor([spec.sigmas] * 2))
    for j, sigma in enumerate(spec.sigmas):
        one = extract(tiny, images, CaptureSpec(layers=(0, 3), store_dtype="float32", sigmas=(sigma,),
                                                concepts=("object", "background")),
                      captions=["a red circle", ""], seeds=[5, 6], max_sequence_length=32)
        torch.testing.assert_close(batched.features[:, :, j], one.features[:, :, 0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(batched.concept_maps[:, j], one.concept_maps[:, 0], atol=1e-4, rtol=1e-4)


def test_concepts_do_not_change_generated_images(tiny):
    kw = dict(seeds=[7], height=64, width=64, num_inference_steps=8, max_sequence_length=32, output_type="np")
    plain = generate(tiny, ["a green ring"], CaptureSpec(), **kw)
    with_concepts = generate(tiny, ["a green ring"], CaptureSpec(concepts=get_task("saliency").concepts), **kw)
    assert np.array_equal(plain.images, with_concepts.images)
    assert torch.equal(plain.capture.features, with_concepts.capture.features)
