"""SD3 / SD3.5 through StableDiffusion3Pipeline: capture, concept attention, real-image mode and heads."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel

from mmdiff_gen.backbones import SD3Backbone, load_backbone, wrap_pipeline
from mmdiff_gen.backbones.sd3 import SD35_LARGE
from mmdiff_gen.backbones.tiny import build_tiny_sd3
from mmdiff_gen.capture import CaptureSpec, extract, generate, plan_schedule
from mmdiff_gen.capture._noise import generators_for
from mmdiff_gen.capture.concepts import concept_block_update, concept_map

PROMPTS = ["a red circle on the left", "a small blue star"]
SEEDS = [3, 4]
KW = dict(height=64, width=64, num_inference_steps=10, max_sequence_length=16)


@pytest.fixture(scope="module", params=["sd3", "sd3.5"])
def sd3(request):
    """SD3-medium-like (no q/k norm) and SD3.5-like (RMS q/k norm, a dual-attention block)."""
    extra = {} if request.param == "sd3" else dict(qk_norm="rms_norm", dual_attention_layers=(0,))
    return wrap_pipeline(build_tiny_sd3(seed=0, **extra), name=f"tiny-{request.param}")


def masked_reference(block, x, txt, c, temb, temb_c):
    """One joint block over [image; text; concepts] with a mask: image and text queries see
    [image; text] keys, concept queries see [image; concepts]. Concepts use the text weights and
    their own modulation. Returns the concept stream after the block and the image / concept
    attention outputs before the output projections."""
    attn = block.attn
    heads = lambda t: t.unflatten(-1, (attn.heads, -1))  # noqa: E731
    norm = lambda m, t: t if m is None else m(t)  # noqa: E731
    last = block.context_pre_only
    nx = block.norm1(x, emb=temb)[0]
    if last:
        nt, nc = block.norm1_context(txt, temb), block.norm1_context(c, temb_c)
    else:
        nt = block.norm1_context(txt, emb=temb)[0]
        nc, gc, shc, scc, gmc = block.norm1_context(c, emb=temb_c)
    q = torch.cat([norm(attn.norm_q, heads(attn.to_q(nx))), norm(attn.norm_added_q, heads(attn.add_q_proj(nt))),
                   norm(attn.norm_added_q, heads(attn.add_q_proj(nc)))], 1)
    k = torch.cat([norm(attn.norm_k, heads(attn.to_k(nx))), norm(attn.norm_added_k, heads(attn.add_k_proj(nt))),
                   norm(attn.norm_added_k, heads(attn.add_k_proj(nc)))], 1)
    v = torch.cat([heads(attn.to_v(nx)), heads(attn.add_v_proj(nt)), heads(attn.add_v_proj(nc))], 1)
    n, s, kk = x.shape[1], txt.shape[1], c.shape[1]
    allowed = torch.zeros(n + s + kk, n + s + kk, dtype=torch.bool)
    allowed[: n + s, : n + s] = True
    allowed[n + s :, :n] = True
    allowed[n + s :, n + s :] = True
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed)
    o_x, _, o_c = out.transpose(1, 2).flatten(2).split([n, s, kk], dim=1)
    if last:
        return c, o_x, o_c
    c = c + gc[:, None] * attn.to_add_out(o_c)
    c = c + gmc[:, None] * block.ff_context(block.norm2_context(c) * (1 + scc[:, None]) + shc[:, None])
    return c, o_x, o_c


@torch.no_grad()
@pytest.mark.parametrize("which", [0, -1], ids=["joint", "last (context_pre_only)"])
def test_concept_block_matches_the_masked_reference(sd3, which):
    torch.manual_seed(0)
    block = sd3.joint_blocks[which]
    attn, dim = block.attn, sd3.feature_dim
    b, s, n, kk = 2, 5, 16, 3
    x, txt, c = torch.randn(b, n, dim), torch.randn(b, s, dim), torch.randn(b, kk, dim)
    temb, temb_c = torch.randn(b, dim), torch.randn(b, dim)
    c_ref, _, o_c_ref = masked_reference(block, x, txt, c, temb, temb_c)
    nx = block.norm1(x, emb=temb)[0]
    heads = lambda t: t.unflatten(-1, (attn.heads, -1))  # noqa: E731
    keys = heads(attn.to_k(nx))
    keys = keys if attn.norm_k is None else attn.norm_k(keys)
    c_ours, o_c = concept_block_update(block, c, temb_c, keys, heads(attn.to_v(nx)))
    torch.testing.assert_close(c_ours, c_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(o_c, o_c_ref, atol=1e-5, rtol=1e-5)
    # The stock block leaves text None after the last block and never sees the concepts.
    t_out, _ = block(hidden_states=x, encoder_hidden_states=txt, temb=temb)
    assert (t_out is None) == (which == -1)


def test_generation_with_cfg_is_bit_identical_and_captures_the_conditional_half(sd3, recorder):
    spec = CaptureSpec(layers=(1, 3), concepts=("object", "background"), cross_attention=True,
                       store_dtype="float32")
    rec = recorder(sd3.transformer, sd3.feature_blocks)
    ours = generate(sd3, PROMPTS, spec, seeds=SEEDS, guidance_scale=5.0, output_type="np", **KW)
    n_calls = len(rec.sigmas)
    plan = plan_schedule(sd3, spec, KW["num_inference_steps"], 64, 64)
    plain = sd3.pipe(prompt=PROMPTS, generator=generators_for(SEEDS), sigmas=list(plan.pipeline_sigmas),
                     guidance_scale=5.0, output_type="np", **KW).images
    assert np.array_equal(ours.images, plain)
    cap = ours.capture
    assert cap.features.shape == (2, 2, 4, 64, sd3.feature_dim)
    assert torch.allclose(cap.sigmas, torch.tensor([spec.sigmas] * 2), atol=1e-6, rtol=0)
    # N sampler calls of 2B rows ([uncond; cond]) plus one conditional forward at σ = 0.001.
    assert n_calls == KW["num_inference_steps"] + len(plan.extra)
    for j, target in enumerate(spec.sigmas):
        call = next(k for k, t in enumerate(rec.sigmas[:n_calls]) if abs(float(t[0]) / 1000 - target) < 1e-6)
        for slot, layer in enumerate(cap.layers):
            out = rec.outputs[call][layer]
            ref = out[2:] if out.shape[0] == 4 else out  # the conditional half of a CFG call
            assert torch.equal(cap.features[:, slot, j], ref)
    torch.testing.assert_close(cap.concept_maps.sum(2), torch.ones(2, 4, 64))
    assert cap.cross_attention.shape == (2, 4, 64) and torch.all(cap.cross_attention > 0)


def test_real_image_mode_matches_a_direct_forward(sd3, recorder):
    spec = CaptureSpec(layers=(0, 2), store_dtype="float32", concepts=("object", "edges"))
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    res = extract(sd3, images, spec, captions=PROMPTS, seeds=[5, 6], max_sequence_length=16)
    assert res.features.shape == (2, 2, 4, 64, sd3.feature_dim)
    # Two sigmas make 2·B rows: real-image mode has no CFG halves, every row is captured.
    two = extract(sd3, images, CaptureSpec(layers=(0, 2), store_dtype="float32", sigmas=(0.78, 0.52)),
                  captions=PROMPTS, seeds=[5, 6], max_sequence_length=16)
    torch.testing.assert_close(two.features, res.features[:, :, :2], atol=1e-5, rtol=1e-5)
    # One sigma by hand: x_σ = (1 − σ)·x0 + σ·ε through the transformer at timestep 1000·σ.
    x0 = sd3.encode_images(images * 2 - 1)
    assert x0.shape == (2, 16, 16, 16)
    noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in generators_for([5, 6])])
    cond = sd3.encode_prompts(PROMPTS, 16)
    rec = recorder(sd3.transformer, sd3.feature_blocks)
    sigma = torch.full((2,), 0.52)
    sd3.transformer(**sd3.transformer_inputs((1 - 0.52) * x0 + 0.52 * noise, sigma, cond, 1.0, 64, 64))
    torch.testing.assert_close(res.features[:, 1, 1], rec.outputs[-1][2], atol=1e-5, rtol=1e-5)


def test_concept_maps_through_the_transformer_match_the_reference(sd3):
    words = ("object", "background", "edges")
    layers = (len(sd3.joint_blocks) - 2, len(sd3.joint_blocks) - 1)
    spec = CaptureSpec(sigmas=(0.6,), concepts=words, concept_layers=layers, store_dtype="float32")
    seen = {}
    hooks = [blk.register_forward_pre_hook(lambda _m, _a, kw, i=i: seen.__setitem__(i, kw), with_kwargs=True)
             for i, blk in enumerate(sd3.joint_blocks)]
    try:
        res = extract(sd3, torch.rand(2, 3, 64, 64), spec, captions=PROMPTS, max_sequence_length=16)
    finally:
        for h in hooks:
            h.remove()
    c = sd3.encode_concepts(words).unsqueeze(0).expand(2, -1, -1)
    temb_c = sd3.concept_temb(torch.full((2,), 600.0), None, sd3.dtype)
    maps = 0
    for i in range(max(layers) + 1):
        kw = seen[i]
        c, o_x, o_c = masked_reference(sd3.joint_blocks[i], kw["hidden_states"], kw["encoder_hidden_states"], c,
                                       kw["temb"], temb_c)
        if i in layers:
            maps = maps + concept_map(o_x, o_c) / len(layers)
    torch.testing.assert_close(res.concept_maps[:, 0], maps.transpose(1, 2), atol=1e-5, rtol=1e-4)


def test_true_cfg_scale_is_refused(sd3):
    with pytest.raises(ValueError, match="already true classifier-free guidance"):
        generate(sd3, PROMPTS[:1], CaptureSpec(), seeds=[0], true_cfg_scale=4.0, **KW)


def test_folder_round_trip_and_short_name(tmp_path):
    build_tiny_sd3(seed=0).save_pretrained(tmp_path / "sd3")
    bb = load_backbone(str(tmp_path / "sd3"), dtype=torch.float32, device="cpu")
    assert isinstance(bb, SD3Backbone) and bb.identity()["family"] == "sd3" and bb.weights_id
    assert load_backbone("tiny-random-sd3", dtype=torch.float32, device="cpu").identity()["family"] == "sd3"


def test_sd35_large_geometry_on_meta():
    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**SD35_LARGE)
    bb = SD3Backbone(SimpleNamespace(transformer=transformer, vae_scale_factor=8), name="SD3.5-large")
    assert len(bb.feature_blocks) == 38 and bb.feature_blocks is bb.joint_blocks
    assert bb.default_layers() == (4, 15, 26, 37) and bb.default_concept_layers() == (30, 31, 32, 33, 34, 35, 36, 37)
    assert bb.feature_dim == 2432 and bb.pixels_per_token == 16 and bb.token_grid(1024, 1024) == (64, 64)
    assert bb.transformer.transformer_blocks[-1].context_pre_only


def test_heads_train_on_sd3_features_and_annotate_its_generations(tmp_path):
    """The FLUX head path unchanged: cache → train → load → generate job, on a tiny SD3."""
    from mmdiff_gen.io.dataset import GeneratedDataset
    from mmdiff_gen.io.readers import FilesDataset
    from mmdiff_gen.jobs.annotate import Annotator, head_files
    from mmdiff_gen.jobs.dataset_job import GenerateJob, run_generate
    from mmdiff_gen.toy.render import write_scenes
    from mmdiff_gen.toy.world import CLASSES
    from mmdiff_gen.train.feature_cache import FeatureCache, build_cache
    from mmdiff_gen.train.trainer import TrainConfig, train_head

    bb = wrap_pipeline(build_tiny_sd3(seed=0), name="tiny-sd3")
    write_scenes(tmp_path / "scenes", 4, seed=0)
    build_cache(bb, FilesDataset(tmp_path / "scenes"), CaptureSpec.for_tasks(["seg"]), tmp_path / "cache",
                batch_size=2)
    cache = FeatureCache(tmp_path / "cache")
    assert cache.grid == (8, 8) and cache.layers == bb.default_layers()
    cfg = TrainConfig(tasks="seg", epochs=1, batch_size=2, head=(("dim", 16), ("decoder_channels", 16)))
    metrics = train_head(cache, cfg, tmp_path / "heads" / "seg.safetensors", classes=list(CLASSES), eval_cache=cache)
    assert np.isfinite(metrics["miou"])
    annotator = Annotator(head_files(tmp_path / "heads", ["seg"]), bb.identity())
    job = GenerateJob(out=tmp_path / "out", tasks=("seg",), images_per_prompt=1, batch_size=2, height=64, width=64,
                      num_inference_steps=6, guidance_scale=5.0, shard_size=4, seed=1)
    report = run_generate(bb, annotator, PROMPTS, job, progress=False)
    assert report.samples_written == 2 and report.samples_failed == 0
    seg = next(iter(GeneratedDataset(tmp_path / "out"))).labels["seg"]
    assert seg.shape == (64, 64) and set(np.unique(seg).tolist()) <= set(range(len(CLASSES)))


def test_overlong_prompts_are_counted_in_t5_tokens(sd3):
    """SD3's second tokenizer is CLIP-G's: the backbone counts a prompt's length with its T5 tokenizer (the third)."""
    assert sd3.t5_tokenizer is sd3.pipe.tokenizer_3 and sd3.t5_tokenizer is not sd3.pipe.tokenizer_2
    t5 = sd3.pipe.tokenizer_3
    long_prompt = "a large red circle " * 40
    n = len(t5(long_prompt).input_ids)
    assert sd3.overlong_prompts(["a cat", long_prompt], n - 1) == [(1, n)]
    assert sd3.overlong_prompts(["a cat", long_prompt], n) == []
