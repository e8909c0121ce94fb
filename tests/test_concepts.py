"""Concept attention against an explicit masked-attention reference, and the cross-attention baseline."""

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb

from mmdiff_gen.capture import CaptureSpec, extract, generate
from mmdiff_gen.tasks import get as get_task
from mmdiff_gen.capture.concepts import concept_block_update, concept_map


def masked_reference(block, x, txt, c, temb, temb_c, rotary):
    """One double-stream block over the joint sequence [text; image; concepts] with a mask.

    Text and image queries see [text; image] keys only; concept queries see [image; concepts] keys.
    Concepts use the text stream's weights and their own modulation; their positions are zero.
    Returns the three streams after the block and the image / concept attention outputs.
    """
    attn, d = block.attn, block.attn.head_dim
    heads = lambda t: t.unflatten(-1, (-1, d))  # noqa: E731
    nx, gx, shx, scx, gmx = block.norm1(x, emb=temb)
    nt, gt, sht, sct, gmt = block.norm1_context(txt, emb=temb)
    nc, gc, shc, scc, gmc = block.norm1_context(c, emb=temb_c)
    q = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(nt))), attn.norm_q(heads(attn.to_q(nx))),
                   attn.norm_added_q(heads(attn.add_q_proj(nc)))], 1)
    k = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(nt))), attn.norm_k(heads(attn.to_k(nx))),
                   attn.norm_added_k(heads(attn.add_k_proj(nc)))], 1)
    v = torch.cat([heads(attn.add_v_proj(nt)), heads(attn.to_v(nx)), heads(attn.add_v_proj(nc))], 1)
    s, n, kk = txt.shape[1], x.shape[1], c.shape[1]
    cos, sin = rotary
    cos = torch.cat([cos, torch.ones(kk, cos.shape[1])])
    sin = torch.cat([sin, torch.zeros(kk, sin.shape[1])])
    q, k = apply_rotary_emb(q, (cos, sin), sequence_dim=1), apply_rotary_emb(k, (cos, sin), sequence_dim=1)
    allowed = torch.zeros(s + n + kk, s + n + kk, dtype=torch.bool)
    allowed[: s + n, : s + n] = True
    allowed[s + n :, s:] = True
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed)
    o_t, o_x, o_c = out.transpose(1, 2).flatten(2).split([s, n, kk], dim=1)

    def finish(h, o, proj, g, sh, sc, gm, norm2, ff):
        h = h + g[:, None] * proj(o)
        return h + gm[:, None] * ff(norm2(h) * (1 + sc[:, None]) + sh[:, None])

    x_new = finish(x, o_x, attn.to_out[0], gx, shx, scx, gmx, block.norm2, block.ff)
    t_new = finish(txt, o_t, attn.to_add_out, gt, sht, sct, gmt, block.norm2_context, block.ff_context)
    c_new = finish(c, o_c, attn.to_add_out, gc, shc, scc, gmc, block.norm2_context, block.ff_context)
    return x_new, t_new, c_new, o_x, o_c


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
    x_ref, t_ref, c_ref, _, o_c_ref = masked_reference(block, x, txt, c, temb, temb_c, rotary)

    # The stock block ignores the concepts entirely: its outputs equal the reference's.
    t_stock, x_stock = block(hidden_states=x, encoder_hidden_states=txt, temb=temb, image_rotary_emb=rotary)
    torch.testing.assert_close(x_stock, x_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t_stock, t_ref, atol=1e-5, rtol=1e-5)

    # Our concept branch, from the image keys / values the stock block computes.
    attn = block.attn
    nx = block.norm1(x, emb=temb)[0]
    keys = attn.norm_k(attn.to_k(nx).unflatten(-1, (-1, attn.head_dim)))
    keys = apply_rotary_emb(keys, (rotary[0][s:], rotary[1][s:]), sequence_dim=1)
    values = attn.to_v(nx).unflatten(-1, (-1, attn.head_dim))
    c_ours, o_c = concept_block_update(block, c, temb_c, keys, values)
    torch.testing.assert_close(c_ours, c_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(o_c, o_c_ref, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_capture_maps_match_the_reference_through_the_transformer(tiny):
    words = ("object", "background", "edges")
    spec = CaptureSpec(sigmas=(0.6,), concepts=words, concept_layers=(0, 1), store_dtype="float32")
    seen = {}
    hooks = [
        blk.register_forward_pre_hook(lambda _m, _a, kw, i=i: seen.__setitem__(i, kw), with_kwargs=True)
        for i, blk in enumerate(tiny.joint_blocks)
    ]
    try:
        images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        res = extract(tiny, images, spec, captions=["a red circle", "a blue star"], max_sequence_length=32)
    finally:
        for h in hooks:
            h.remove()
    c = tiny.encode_concepts(words).unsqueeze(0).expand(2, -1, -1)
    temb_c = tiny.concept_temb(torch.full((2,), 0.6), torch.full((2,), 3.5), tiny.dtype)
    maps = 0
    for i in (0, 1):
        kw = seen[i]
        _, _, c, o_x, o_c = masked_reference(
            tiny.joint_blocks[i], kw["hidden_states"], kw["encoder_hidden_states"], c, kw["temb"], temb_c,
            kw["image_rotary_emb"],
        )
        maps = maps + concept_map(o_x, o_c) / 2  # (B, N, K)
    torch.testing.assert_close(res.concept_maps[:, 0], maps.transpose(1, 2), atol=1e-5, rtol=1e-4)


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
