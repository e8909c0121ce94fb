"""FLUX.2 through Flux2KleinPipeline (tiny, random) and FLUX.2 [dev] on the meta device: capture, contract, geometry."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import Flux2Transformer2DModel
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux2 import Flux2Modulation

from mmdiff_gen.backbones import Flux2Backbone, wrap_pipeline
from mmdiff_gen.backbones.flux2 import FLUX2_DEV
from mmdiff_gen.backbones.loading import _adapter_for
from mmdiff_gen.backbones.tiny import build_tiny_flux2
from mmdiff_gen.capture import Capture, CaptureSpec, extract, generate, plan_schedule
from mmdiff_gen.capture._noise import generators_for
from mmdiff_gen.capture.concepts import concept_map

PROMPTS = ["a red circle on the left", "a small blue star"]
SEEDS = [3, 4]
KW = dict(height=64, width=64, num_inference_steps=6, max_sequence_length=16)


@pytest.fixture(scope="module")
def klein():
    return wrap_pipeline(build_tiny_flux2(seed=0), name="tiny-flux2")


class Recorder:
    """Reference hooks, independent of mmdiff_gen: each transformer call's timestep and every single-stream block's
    image tokens (the last N of its [text; image] output, N the call's image tokens)."""

    def __init__(self, transformer, blocks):
        self.sigmas, self.outputs, self._n = [], [], 0
        self.handles = [transformer.register_forward_pre_hook(self._pre, with_kwargs=True)]
        self.handles += [b.register_forward_hook(self._out(i)) for i, b in enumerate(blocks)]

    def _pre(self, _m, _a, kwargs):
        self.sigmas.append(kwargs["timestep"].detach().clone())
        self._n = kwargs["hidden_states"].shape[1]
        self.outputs.append({})

    def _out(self, i):
        def hook(_m, _i, out):
            self.outputs[-1][i] = out[:, -self._n:].detach().clone()
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


@pytest.fixture
def recorder():
    made = []
    yield lambda tr, blocks: made.append(Recorder(tr, blocks)) or made[-1]
    for r in made:
        r.close()


def test_registry_and_the_pinned_diffusers_behaviour(klein):
    assert _adapter_for("Flux2KleinPipeline") is Flux2Backbone and _adapter_for("Flux2Pipeline") is Flux2Backbone
    assert klein.feature_blocks is klein.transformer.single_transformer_blocks
    assert klein.joint_blocks is klein.transformer.transformer_blocks
    # diffusers 0.42: double-stream blocks return (text, image), single-stream blocks the [text; image] tensor.
    tr, s, n = klein.transformer, 5, 64
    x, txt = torch.randn(1, n, klein.feature_dim), torch.randn(1, s, klein.feature_dim)
    mod1 = torch.randn(1, 3 * klein.feature_dim)
    single = tr.single_transformer_blocks[0](hidden_states=torch.cat([txt, x], 1), encoder_hidden_states=None,
                                             temb_mod=mod1)
    assert isinstance(single, torch.Tensor) and single.shape == (1, s + n, klein.feature_dim)
    double = tr.transformer_blocks[0](hidden_states=x, encoder_hidden_states=txt, temb_mod_img=torch.cat([mod1] * 2, 1),
                                      temb_mod_txt=torch.cat([mod1] * 2, 1))
    assert isinstance(double, tuple) and double[1].shape == (1, n, klein.feature_dim)
    assert klein.pixels_per_token == 8 and klein.token_grid(64, 64) == (8, 8)
    assert not klein.FLOAT16_OK and klein.identity()["family"] == "flux2"


def test_klein_sampling_defaults_and_the_four_step_contract(klein):
    s = klein.sampling_kwargs()
    assert (s["num_inference_steps"], s["guidance_scale"]) == (4, 1.0)  # distilled [klein]
    base = wrap_pipeline(build_tiny_flux2(seed=0, distilled=False), name="base")
    assert (base.sampling_kwargs()["num_inference_steps"], base.sampling_kwargs()["guidance_scale"]) == (50, 4.0)
    assert klein.default_sigmas == (0.001,) and base.default_sigmas is None
    for size in (64, 512, 1024):
        # 4 distilled steps stay above σ ≈ 0.7 (compute_empirical_mu): only 0.001 is captured, one extra forward.
        plan = plan_schedule(klein, CaptureSpec(sigmas=klein.default_sigmas), 4, size, size)
        assert plan.extra == (0.001,) and plan.sigmas == plan.default_sigmas and plan.default_sigmas[-1] > 0.7
        with pytest.raises(ValueError, match=r"\[klein\] \(4-step distilled\) never samples below"):
            plan_schedule(klein, CaptureSpec(), 4, size, size)  # the paper's sigmas: 3–4 extra forwards
    with pytest.raises(ValueError, match="no true_cfg_scale"):
        generate(klein, PROMPTS[:1], CaptureSpec(sigmas=(0.001,)), seeds=[0], true_cfg_scale=4.0, **KW)


@pytest.mark.parametrize("distilled, guidance, steps, sigmas", [(True, 1.0, 4, (0.9, 0.001)),
                                                                 (False, 3.0, 6, (0.78, 0.52, 0.26, 0.001))],
                         ids=["distilled", "base-cfg"])
def test_images_bit_identical_and_features_are_the_block_outputs(recorder, distilled, guidance, steps, sigmas):
    bb = wrap_pipeline(build_tiny_flux2(seed=0, distilled=distilled), name="tiny-flux2")
    stream = dict(concepts=("object", "edges"), cross_attention=True) if distilled else {}
    spec = CaptureSpec(layers=(1, 3), store_dtype="float32", sigmas=sigmas, **stream)
    kw = {**KW, "num_inference_steps": steps}
    rec = recorder(bb.transformer, bb.feature_blocks)
    ours = generate(bb, PROMPTS, spec, seeds=SEEDS, guidance_scale=guidance, output_type="np", **kw)
    calls = list(rec.sigmas)
    plan = plan_schedule(bb, spec, steps, 64, 64)
    plain = bb.pipe(prompt=PROMPTS, generator=generators_for(SEEDS), sigmas=list(plan.pipeline_sigmas),
                    guidance_scale=guidance, output_type="np", **kw).images
    assert np.array_equal(ours.images, plain)
    cap = ours.capture
    assert cap.features.shape == (2, 2, len(sigmas), 64, bb.feature_dim)
    assert torch.allclose(cap.sigmas, torch.tensor([spec.sigmas] * 2), atol=1e-6, rtol=0)
    cfg_calls = 1 if distilled else 2  # [klein] base: a conditional, then an unconditional call per step
    assert len(calls) == cfg_calls * steps + len(plan.extra)
    for j, target in enumerate(spec.sigmas):
        call = next(k for k, t in enumerate(calls) if abs(float(t[0]) - target) < 1e-6)  # the conditional call first
        for slot, layer in enumerate(cap.layers):
            assert torch.equal(cap.features[:, slot, j], rec.outputs[call][layer])


def test_joint_block_features_and_real_image_mode(klein, recorder):
    spec = CaptureSpec(layers=(0, 1), blocks="joint", store_dtype="float32", sigmas=(0.52,))
    seen = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: seen.append(out[1].clone())) for b in klein.joint_blocks]
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    try:
        res = extract(klein, images, spec, captions=PROMPTS, seeds=[5, 6], max_sequence_length=16)
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(res.features[:, 0, 0], seen[0]) and torch.equal(res.features[:, 1, 0], seen[1])
    # Feature blocks at the paper's sigmas; one sigma by hand: x_σ = (1 − σ)·x0 + σ·ε at timestep σ.
    res = extract(klein, images, CaptureSpec(layers=(0, 2), store_dtype="float32"), captions=PROMPTS, seeds=[5, 6],
                  max_sequence_length=16)
    assert res.features.shape == (2, 2, 4, 64, klein.feature_dim)
    x0 = klein.encode_images(images * 2 - 1)
    assert x0.shape == (2, 64, klein.transformer.config.in_channels)
    noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in generators_for([5, 6])])
    rec = recorder(klein.transformer, klein.feature_blocks)
    cond = klein.encode_prompts(PROMPTS, 16)
    klein.transformer(**klein.transformer_inputs((1 - 0.52) * x0 + 0.52 * noise, torch.full((2,), 0.52), cond, 1.0,
                                                 64, 64))
    torch.testing.assert_close(res.features[:, 1, 1], rec.outputs[-1][2], atol=1e-5, rtol=1e-5)


def masked_reference(block, kw, c, mod_c):
    """One double-stream block over [text; image; concepts] with a mask: text and image queries see [text; image]
    keys, concept queries see [image; concepts]. Concepts use the text weights, the text modulation computed at their
    timestep and position 0 (RoPE the identity). Returns the concept stream after the block and the image / concept
    attention outputs before the output projections."""
    attn, x, txt = block.attn, kw["hidden_states"], kw["encoder_hidden_states"]
    heads = lambda t: t.unflatten(-1, (attn.heads, -1))  # noqa: E731
    (sh, sc, _), _ = Flux2Modulation.split(kw["temb_mod_img"], 2)
    (tsh, tsc, _), _ = Flux2Modulation.split(kw["temb_mod_txt"], 2)
    (csh, csc, cg), (csh2, csc2, cg2) = Flux2Modulation.split(mod_c, 2)
    nx, nt = block.norm1(x) * (1 + sc) + sh, block.norm1_context(txt) * (1 + tsc) + tsh
    nc = block.norm1_context(c) * (1 + csc) + csh
    q = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(nt))), attn.norm_q(heads(attn.to_q(nx))),
                   attn.norm_added_q(heads(attn.add_q_proj(nc)))], 1)
    k = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(nt))), attn.norm_k(heads(attn.to_k(nx))),
                   attn.norm_added_k(heads(attn.add_k_proj(nc)))], 1)
    v = torch.cat([heads(attn.add_v_proj(nt)), heads(attn.to_v(nx)), heads(attn.add_v_proj(nc))], 1)
    s, n, kk = txt.shape[1], x.shape[1], c.shape[1]
    cos, sin = kw["image_rotary_emb"]  # (S + N, D)
    rot = (torch.cat([cos, torch.ones(kk, cos.shape[1])]), torch.cat([sin, torch.zeros(kk, sin.shape[1])]))
    q, k = apply_rotary_emb(q, rot, sequence_dim=1), apply_rotary_emb(k, rot, sequence_dim=1)
    allowed = torch.zeros(s + n + kk, s + n + kk, dtype=torch.bool)
    allowed[: s + n, : s + n] = True
    allowed[s + n :, s : s + n] = True
    allowed[s + n :, s + n :] = True
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed)
    _, o_x, o_c = out.transpose(1, 2).flatten(2).split([s, n, kk], dim=1)
    c = c + cg * attn.to_add_out(o_c)
    c = c + cg2 * block.ff_context(block.norm2_context(c) * (1 + csc2) + csh2)
    return c, o_x, o_c


def test_concept_maps_through_the_transformer_match_the_reference(klein):
    words = ("object", "background", "edges")
    layers = (0, 1)
    spec = CaptureSpec(sigmas=(0.6,), concepts=words, concept_layers=layers, store_dtype="float32")
    seen = {}
    hooks = [blk.register_forward_pre_hook(lambda _m, _a, kw, i=i: seen.__setitem__(i, kw), with_kwargs=True)
             for i, blk in enumerate(klein.joint_blocks)]
    try:
        res = extract(klein, torch.rand(2, 3, 64, 64), spec, captions=PROMPTS, max_sequence_length=16)
    finally:
        for h in hooks:
            h.remove()
    c = klein.encode_concepts(words).unsqueeze(0).expand(2, -1, -1)
    mod_c = klein.concept_temb(torch.full((2,), 0.6), None, klein.dtype)
    assert mod_c.shape == (2, 6 * klein.feature_dim)
    maps = 0
    for i in layers:
        c, o_x, o_c = masked_reference(klein.joint_blocks[i], seen[i], c, mod_c)
        maps = maps + concept_map(o_x, o_c) / len(layers)
    torch.testing.assert_close(res.concept_maps[:, 0], maps.transpose(1, 2), atol=1e-5, rtol=1e-4)


def test_flux1_heads_do_not_load(klein, tmp_path):
    from mmdiff_gen.backbones.tiny import build_tiny_flux
    from mmdiff_gen.heads.checkpoint import HeadMismatch, load_head
    from _helpers import make_heads

    make_heads(wrap_pipeline(build_tiny_flux(seed=0), name="tiny"), tmp_path, tasks=("seg",))
    with pytest.raises(HeadMismatch, match="trained on 'tiny' \\(flux,"):
        load_head(tmp_path / "seg.safetensors", backbone=klein.identity())


@pytest.fixture(scope="module")
def flux2_dev():
    with torch.device("meta"):
        transformer = Flux2Transformer2DModel(**FLUX2_DEV)
    # FLUX.2's VAE (AutoencoderKLFlux2) has 4 block widths: scale factor 8; the pipelines patchify 2×2.
    return Flux2Backbone(SimpleNamespace(transformer=transformer, vae_scale_factor=8), name="FLUX.2-dev")


def test_flux2_dev_defaults(flux2_dev):
    assert len(flux2_dev.feature_blocks) == 48 and len(flux2_dev.joint_blocks) == 8
    assert flux2_dev.default_layers() == (5, 19, 33, 47)
    assert flux2_dev.default_layers(blocks="joint") == (1, 3, 5, 7)
    assert flux2_dev.feature_dim == 6144 and flux2_dev.pixels_per_token == 16
    assert flux2_dev.token_grid(512, 512) == (32, 32) and flux2_dev.token_grid(1024, 1024) == (64, 64)
    assert (flux2_dev.sampling_kwargs()["num_inference_steps"], flux2_dev.sampling_kwargs()["guidance_scale"]) == (50, 4.0)
    with pytest.raises(ValueError, match=r"FLUX.2 \[dev\]: concept tokens"):
        flux2_dev.encode_concepts(("object",))


@pytest.mark.parametrize("size, tokens", [(512, 1024), (1024, 4096)])
def test_flux2_dev_feature_shapes(flux2_dev, size, tokens):
    b, spec = 1, CaptureSpec(sigmas=(0.5,))
    kwargs = flux2_dev.meta_inputs(b, size, size, 512)
    with Capture(flux2_dev, spec, batch_size=b, height=size, width=size, planned=True) as cap, torch.device("meta"):
        assert cap.arm([0.5] * b)
        flux2_dev.transformer(**kwargs)
        cap.collect()
    assert cap.features.shape == (b, 4, 1, tokens, 6144)


def test_folder_round_trip(tmp_path):
    from mmdiff_gen.backbones import load_backbone

    build_tiny_flux2(seed=0).save_pretrained(tmp_path / "klein")
    bb = load_backbone(str(tmp_path / "klein"), dtype=torch.float32, device="cpu")
    assert isinstance(bb, Flux2Backbone) and bb.klein and bb.distilled and bb.identity()["family"] == "flux2"


def test_heads_train_on_flux2_features_and_annotate_its_generations(tmp_path):
    """Cache → train → load → generate job on a tiny [klein] base (CFG; the paper's sigmas: 3 extra forwards)."""
    from mmdiff_gen.io.dataset import GeneratedDataset
    from mmdiff_gen.io.readers import FilesDataset
    from mmdiff_gen.jobs.annotate import Annotator, head_files
    from mmdiff_gen.jobs.dataset_job import GenerateJob, run_generate
    from mmdiff_gen.toy.render import write_scenes
    from mmdiff_gen.toy.world import CLASSES
    from mmdiff_gen.train.feature_cache import FeatureCache, build_cache
    from mmdiff_gen.train.trainer import TrainConfig, train_head

    bb = wrap_pipeline(build_tiny_flux2(seed=0, distilled=False), name="tiny-flux2-base")
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
                      num_inference_steps=6, guidance_scale=3.0, shard_size=4, seed=1)
    report = run_generate(bb, annotator, PROMPTS, job, progress=False)
    assert report.samples_written == 2 and report.samples_failed == 0
    seg = next(iter(GeneratedDataset(tmp_path / "out"))).labels["seg"]
    assert seg.shape == (64, 64) and set(np.unique(seg).tolist()) <= set(range(len(CLASSES)))
