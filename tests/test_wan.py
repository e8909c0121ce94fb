"""The Wan (text-to-video) adapter on a tiny WanPipeline built from configs (random weights; 64×64 clips of 9 frames =
3 latent frames × 8×8 tokens), and the released Wan configs on the meta device.

What the image families' contract (`test_families.py`) checks, for clips: video bit-identical with capture on and off
under Wan's CFG; the sigmas received (UniPC's integer timesteps) are the contract's; features are the blocks' outputs;
real-video mode is one forward at x_σ; concept, cross-attention and per-token image→text maps equal a hand-written
cross-attention reference; compile, offload and LoRA leave capture as it is, fp8 / int8 storage close to it; heads
of another family are refused; a saved folder is recognised, built on the meta device and inspected.
"""

import math

import numpy as np
import pytest
import torch

from mmdiff_gen.backbones import WanBackbone, wrap_pipeline
from mmdiff_gen.backbones.tiny import build_tiny_wan
from mmdiff_gen.capture import CaptureSpec, compile_backbone, extract, generate, plan_schedule
from mmdiff_gen.capture._noise import generators_for

PROMPTS = ["a red circle on the left", "a small blue star"]
SEEDS = [3, 4]
FRAMES = 9
KW = dict(height=64, width=64, num_frames=FRAMES, num_inference_steps=12, guidance_scale=5.0, max_sequence_length=16)
GRID = (3, 8, 8)
N_TOKENS = math.prod(GRID)


@pytest.fixture(scope="module")
def bb():
    return wrap_pipeline(build_tiny_wan(seed=0), name="tiny-wan")


def test_geometry_and_sampling(bb):
    assert isinstance(bb, WanBackbone) and bb.identity()["family"] == "wan"
    assert bb.pixels_per_token == 8 and bb.token_grid(64, 64, FRAMES) == GRID and bb.token_grid(64, 64) == (8, 8)
    assert bb.latent_frames(1) == 1 and bb.latent_frames(81) == 21
    with pytest.raises(ValueError, match=r"4·n \+ 1"):
        bb.token_grid(64, 64, 8)
    s = bb.sampling_kwargs()
    assert (s["num_frames"], s["height"], s["width"], s["guidance_scale"], s["max_sequence_length"]) == (81, 480, 832,
                                                                                                       5.0, 512)
    with pytest.raises(ValueError, match="generates images"):  # an image family is never handed a frame count
        wrap_pipeline(__import__("mmdiff_gen.backbones.tiny", fromlist=["x"]).build_tiny_flux(seed=0)).sampling_kwargs(
            num_frames=9)


def test_the_contract_on_unipc_integer_timesteps(bb):
    plan = plan_schedule(bb, CaptureSpec(), 12, 64, 64, FRAMES)
    # The transformer receives floor(σ·1000) / 1000: each placed target exactly, 0.001 as one extra forward.
    assert {plan.sigmas[i] for i in plan.steps.values()} == {0.78, 0.52, 0.26} and plan.extra == (0.001,)
    assert all(round(s * 1000) == s * 1000 for s in plan.sigmas)
    with pytest.raises(ValueError, match="multiples of 0.001"):
        plan_schedule(bb, CaptureSpec(sigmas=(0.7805,)), 12, 64, 64, FRAMES)


def test_video_bit_identical_the_contract_sigmas_and_the_block_outputs(bb, recorder):
    spec = CaptureSpec(layers=(1, 3), concepts=("object", "edges"), cross_attention=True, text_attention_layers=(1,),
                       store_dtype="float32")
    rec = recorder(bb.transformer, bb.feature_blocks, N_TOKENS)
    ours = generate(bb, PROMPTS, spec, seeds=SEEDS, output_type="np", **KW)
    calls = list(rec.timesteps)
    plan = plan_schedule(bb, spec, KW["num_inference_steps"], 64, 64, FRAMES)
    plain = bb.run_pipeline(prompt=PROMPTS, generator=generators_for(SEEDS), sigmas=list(plan.pipeline_sigmas),
                            output_type="np", **KW)
    assert ours.images.shape == (2, FRAMES, 64, 64, 3) and np.array_equal(ours.images, plain)
    cap = ours.capture
    assert cap.grid == GRID and cap.features.shape == (2, 2, 4, N_TOKENS, bb.feature_dim)
    assert torch.equal(cap.sigmas, torch.tensor([spec.sigmas] * 2))  # whole thousandths: exact
    assert len(calls) == 2 * KW["num_inference_steps"] + len(plan.extra)  # CFG: a second, unconditional call
    for j, target in enumerate(spec.sigmas):
        call = next(k for k, t in enumerate(calls) if int(t[0]) == round(target * 1000))  # the conditional, first
        for slot, layer in enumerate(cap.layers):
            assert torch.equal(cap.features[:, slot, j], rec.outputs[call][layer])
    torch.testing.assert_close(cap.concept_maps.sum(2), torch.ones(2, 4, N_TOKENS))
    assert cap.mean_concept_maps().shape == (2, 2, *GRID)
    assert cap.cross_attention.shape == (2, 4, N_TOKENS) and torch.all(cap.cross_attention > 0)
    assert cap.text_attention.shape == (2, 4, 1, N_TOKENS, 16)


def test_real_video_mode_is_one_forward_at_x_sigma(bb, recorder):
    clips = torch.rand(2, FRAMES, 3, 64, 64, generator=torch.Generator().manual_seed(1))  # (B, F, 3, H, W) in [0, 1]
    res = extract(bb, clips, CaptureSpec(layers=(0, 2), store_dtype="float32"), captions=PROMPTS, seeds=[5, 6],
                  max_sequence_length=16)
    assert res.grid == GRID and res.features.shape == (2, 2, 4, N_TOKENS, bb.feature_dim)
    x0 = bb.encode_images(clips.permute(0, 2, 1, 3, 4) * 2 - 1)  # (B, z, f, h, w)
    assert x0.shape == (2, 8, 3, 16, 16)
    noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in generators_for([5, 6])])
    rec = recorder(bb.transformer, bb.feature_blocks, N_TOKENS)
    bb.transformer(hidden_states=(1 - 0.52) * x0 + 0.52 * noise, timestep=torch.tensor([520, 520]),
                   encoder_hidden_states=bb.encode_prompts(PROMPTS, 16)["encoder_hidden_states"], return_dict=False)
    torch.testing.assert_close(res.features[:, 1, 1], rec.outputs[-1][2], atol=1e-5, rtol=1e-5)


def test_wan22_ti2v_per_token_timestep_and_16x_vae():
    """Wan 2.2 TI2V's kind (a residual VAE that patchifies 2×2: 16 px per token here; one float timestep per video
    token): video bit-identical with capture on and off, the contract's sigmas read from per-token timesteps,
    features = block outputs, and real-video mode = one forward at x_σ with the pipeline's per-token layout."""
    bb = wrap_pipeline(build_tiny_wan(seed=0, ti2v=True), name="tiny-wan-ti2v")
    grid, n = (3, 4, 4), 48
    assert bb.per_token_timestep and bb.pixels_per_token == 16 and bb.token_grid(64, 64, FRAMES) == grid
    spec = CaptureSpec(layers=(1, 3), concepts=("object",), cross_attention=True, store_dtype="float32")
    seen = []
    hook = bb.transformer.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["timestep"].clone()),
                                                    with_kwargs=True)
    try:
        ours = generate(bb, PROMPTS, spec, seeds=SEEDS, output_type="np", **KW)
        plan = plan_schedule(bb, spec, KW["num_inference_steps"], 64, 64, FRAMES)
        plain = bb.run_pipeline(prompt=PROMPTS, generator=generators_for(SEEDS), sigmas=list(plan.pipeline_sigmas),
                                output_type="np", **KW)
        clips = torch.rand(2, FRAMES, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        real = extract(bb, clips, CaptureSpec(layers=(0, 2), store_dtype="float32"), captions=PROMPTS, seeds=[5, 6],
                       max_sequence_length=16)
    finally:
        hook.remove()
    assert np.array_equal(ours.images, plain)
    assert seen[0].shape == (2, n) and seen[0].dtype == torch.float32
    # Real-video mode's one forward: 2 clips × 4 sigmas, each row's tokens at its sigma.
    assert seen[-1].shape == (8, n) and torch.equal(seen[-1], seen[-1][:, :1].expand(-1, n))
    assert torch.equal(ours.capture.sigmas, torch.tensor([spec.sigmas] * 2))
    assert ours.capture.features.shape == (2, 2, 4, n, bb.feature_dim) and ours.capture.grid == grid
    x0 = bb.encode_images(clips.permute(0, 2, 1, 3, 4) * 2 - 1)
    assert x0.shape == (2, 8, 3, 8, 8)
    noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in generators_for([5, 6])])
    out = {}
    hook = bb.feature_blocks[2].register_forward_hook(lambda _m, _i, o: out.__setitem__("x", o))
    try:
        bb.transformer(hidden_states=(1 - 0.52) * x0 + 0.52 * noise, timestep=torch.full((2, n), 520.0),
                       encoder_hidden_states=bb.encode_prompts(PROMPTS, 16)["encoder_hidden_states"],
                       return_dict=False)
    finally:
        hook.remove()
    torch.testing.assert_close(real.features[:, 1, 1], out["x"], atol=1e-5, rtol=1e-5)


def _reference(attn, x, text, concepts, prompt_mask):
    """Wan's cross-attention written out from diffusers 0.42's WanAttnProcessor: q / k RMS-normed across heads, then
    split; softmax over the text keys alone. Returns the block's attention output (to check the reference is the
    block), the per-token image→text probabilities (B, N, S), the averaged prompt attention (B, N) and the concept
    maps (B, N, K): the image queries against the concepts' keys alone, softmax over concepts, mean over heads."""
    heads = lambda t: t.unflatten(-1, (attn.heads, -1)).transpose(1, 2)  # noqa: E731  (B, H, L, D)
    q, k, v = heads(attn.norm_q(attn.to_q(x))), heads(attn.norm_k(attn.to_k(text))), heads(attn.to_v(text))
    probs = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)  # (B, H, N, S)
    out = attn.to_out[0]((probs @ v).transpose(1, 2).flatten(2))
    ck = heads(attn.norm_k(attn.to_k(concepts)))  # (1, H, K, D)
    maps = (q @ ck.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1).mean(1)
    p_text = probs.mean(1)
    m = prompt_mask.float()[:, None]
    return out, p_text, (p_text * m).sum(-1) / m.sum(-1), maps


def test_concept_cross_and_text_attention_maps_equal_the_reference(bb):
    words, layers = ("object", "background", "edges"), (1, 3)
    spec = CaptureSpec(sigmas=(0.6,), concepts=words, concept_layers=layers, text_attention_layers=layers,
                       cross_attention=True, store_dtype="float32")
    seen = {}

    def keep(i):
        def hook(_m, args, out):
            seen[i] = (args[0], args[1], out)
        return hook

    hooks = [bb.joint_blocks[i].attn2.register_forward_hook(keep(i)) for i in layers]
    try:
        res = extract(bb, torch.rand(2, FRAMES, 3, 64, 64), spec, captions=PROMPTS, max_sequence_length=16)
    finally:
        for h in hooks:
            h.remove()
    # The concept tokens by hand: each word alone through the pipeline's T5, token 0, the transformer's text input.
    tok = bb.pipe.tokenizer(list(words), padding="max_length", max_length=8, return_tensors="pt")
    t5 = bb.pipe.text_encoder(tok.input_ids, tok.attention_mask).last_hidden_state[:, 0]
    concepts = bb.transformer.condition_embedder.text_embedder(t5)[None]  # (1, K, C)
    torch.testing.assert_close(bb.encode_concepts(words), concepts[0])
    mask = bb.text_token_mask(PROMPTS, 16)
    maps = cross = 0
    for slot, i in enumerate(layers):
        x, text, block_out = seen[i]
        out, p_text, c, m = _reference(bb.joint_blocks[i].attn2, x, text, concepts, mask)
        torch.testing.assert_close(out, block_out, atol=1e-5, rtol=1e-5)  # the reference is the block
        torch.testing.assert_close(res.text_attention[:, 0, slot], p_text, atol=1e-6, rtol=1e-5)
        maps, cross = maps + m / len(layers), cross + c / len(layers)
    torch.testing.assert_close(res.concept_maps[:, 0], maps.transpose(1, 2), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(res.cross_attention[:, 0], cross, atol=1e-6, rtol=1e-5)


def test_compiled_and_offloaded_capture_as_eager_and_resident():
    """torch.compile by blocks (aot_eager) with capture's hooks inside, model and leaf-level group offload: the same
    video, features and concept maps."""
    import torch._dynamo

    from mmdiff_gen.backbones.runtime import apply_runtime

    spec = CaptureSpec(layers=(0, 3), concepts=("object",), cross_attention=True, store_dtype="float32")
    kw = dict(output_type="np", **KW)
    eager = generate(wrap_pipeline(build_tiny_wan(seed=0)), PROMPTS, spec, seeds=SEEDS, **kw)
    compiled = wrap_pipeline(build_tiny_wan(seed=0))
    torch._dynamo.reset()
    try:
        compile_backbone(compiled, "blocks", backend="aot_eager")
        ours = generate(compiled, PROMPTS, spec, seeds=SEEDS, **kw)
    finally:
        torch._dynamo.reset()
    runs = [ours]
    for offload in ("model", "group"):
        pipe = build_tiny_wan(seed=0)
        apply_runtime(pipe, offload=offload, storage="full", dtype=torch.float32, device="cpu")
        runs.append(generate(wrap_pipeline(pipe), PROMPTS, spec, seeds=SEEDS, **kw))
    for run in runs:
        assert np.array_equal(run.images, eager.images)
        for name in ("features", "concept_maps", "cross_attention"):
            torch.testing.assert_close(getattr(run.capture, name), getattr(eager.capture, name), atol=1e-5, rtol=1e-5)


def test_a_lora_changes_the_features_and_enters_the_identity(bb, tmp_path):
    """A LoRA on the self- and cross-attention projections, saved by WanPipeline and loaded by `--lora`'s path."""
    from peft import LoraConfig, get_peft_model_state_dict

    from mmdiff_gen.backbones.loading import load_lora

    spec = CaptureSpec(layers=(0, 3), concepts=("object", "edges"), store_dtype="float32")
    kw = dict(output_type="np", **KW)
    before = generate(bb, PROMPTS, spec, seeds=SEEDS, **kw)
    donor = build_tiny_wan(seed=0)
    donor.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"]))
    with torch.no_grad():  # peft starts B at zero: a trained adapter does not
        for name, p in donor.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    type(donor).save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(donor.transformer))
    pipe = build_tiny_wan(seed=0)
    load_lora(pipe, tmp_path, scale=1.0, name="style")
    adapted = wrap_pipeline(pipe, name="tiny-wan")
    after = generate(adapted, PROMPTS, spec, seeds=SEEDS, **kw)
    assert [x["name"] for x in adapted.identity()["lora"]] == ["style"]
    assert not torch.allclose(after.capture.features, before.capture.features)
    assert not torch.allclose(after.capture.concept_maps, before.capture.concept_maps)  # hooks on the adapted attn2
    pipe.set_adapters(["style"], adapter_weights=[0.0])
    again = generate(adapted, PROMPTS, spec, seeds=SEEDS, **kw)
    torch.testing.assert_close(again.capture.features, before.capture.features, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("storage", ["fp8", "int8"])
def test_quantized_storage_captures_close_to_full_precision(bb, storage):
    """fp8 (layerwise-cast) and int8 (torchao weight-only) transformer storage, as `--storage` applies them."""
    from mmdiff_gen.backbones.runtime import apply_runtime

    spec = CaptureSpec(layers=(0, 3), concepts=("object",), store_dtype="float32")
    kw = dict(output_type="np", **KW)
    ref = generate(bb, PROMPTS, spec, seeds=SEEDS, **kw)
    pipe = build_tiny_wan(seed=0)
    apply_runtime(pipe, offload="none", storage=storage, dtype=torch.float32, device="cpu")
    ours = generate(wrap_pipeline(pipe, name="tiny-wan"), PROMPTS, spec, seeds=SEEDS, **kw)
    rel = (ours.capture.features - ref.capture.features).norm() / ref.capture.features.norm()
    assert 0 < rel < 0.25, float(rel)
    assert ours.images.shape == ref.images.shape and np.isfinite(ours.images).all()


def test_heads_of_another_family_are_refused(bb, tiny, tmp_path):
    from _helpers import make_heads

    from mmdiff_gen.heads.checkpoint import HeadMismatch, load_head

    make_heads(bb, tmp_path, tasks=("seg",))
    with pytest.raises(HeadMismatch, match=r"trained on 'tiny-wan' \(wan,"):
        load_head(tmp_path / "seg.safetensors", backbone=tiny.identity())
    make_heads(tiny, tmp_path / "flux", tasks=("seg",))
    with pytest.raises(HeadMismatch, match=r"\(flux,"):
        load_head(tmp_path / "flux" / "seg.safetensors", backbone=bb.identity())


def test_a_saved_folder_is_recognised_loaded_built_on_meta_and_inspected(tmp_path):
    from typer.testing import CliRunner

    from mmdiff_gen.backbones import load_backbone
    from mmdiff_gen.backbones.loading import adapter_class, meta_backbone
    from mmdiff_gen.cli import app

    build_tiny_wan(seed=0).save_pretrained(tmp_path / "wan")
    assert adapter_class(str(tmp_path / "wan")) is WanBackbone
    loaded = load_backbone(str(tmp_path / "wan"), dtype=torch.float32, device="cpu")
    assert isinstance(loaded, WanBackbone) and loaded.token_grid(64, 64, FRAMES) == GRID
    meta = meta_backbone(str(tmp_path / "wan"))
    assert meta.pixels_per_token == 8 and len(meta.feature_blocks) == 4
    assert meta.identity()["config_sha256"] == loaded.identity()["config_sha256"]
    res = CliRunner().invoke(app, ["inspect", "--model", str(tmp_path / "wan"), "--size", "64", "--steps", "12"])
    assert res.exit_code == 0 and "(wan)" in res.output and "81 frames" in res.output, res.output


def test_two_transformer_wan_is_refused():
    pipe = build_tiny_wan(seed=0)
    pipe.transformer_2 = pipe.transformer
    with pytest.raises(ValueError, match="second .*transformer"):
        WanBackbone(pipe, "a14b")


REAL = {  # name: (config, VAE's spatial factor, blocks, width, default layers, default clip (frames, H, W), grid)
    "Wan2.1-T2V-1.3B": ("WAN_2_1_T2V_1_3B", 8, 30, 1536, (3, 12, 20, 29), (81, 480, 832), (21, 30, 52)),
    "Wan2.1-T2V-14B": ("WAN_2_1_T2V_14B", 8, 40, 5120, (4, 16, 27, 39), (81, 480, 832), (21, 30, 52)),
    "Wan2.2-TI2V-5B": ("WAN_2_2_TI2V_5B", 16, 30, 3072, (3, 12, 20, 29), (121, 704, 1280), (31, 22, 40)),
}


@pytest.mark.parametrize("name", list(REAL))
def test_the_real_config_on_the_meta_device(name):
    """Wan as released, no weights: 81 frames at 480×832 are 21 latent frames × 30×52 tokens = 32 760 tokens per
    clip (Wan 2.2 TI2V: 121 frames at 704×1280, 32 px per token, 31 × 22×40); capture takes them all at a block."""
    from mmdiff_gen.backbones import wan
    from mmdiff_gen.backbones.flops import config_backbone
    from mmdiff_gen.capture import Capture

    attr, factor, blocks, width, layers, (frames, h, w), grid = REAL[name]
    bb = config_backbone(WanBackbone, "WanTransformer3DModel", getattr(wan, attr), vae_scale_factor=factor, name=name)
    assert (len(bb.feature_blocks), bb.feature_dim, bb.default_layers()) == (blocks, width, layers)
    assert bb.pixels_per_token == 2 * factor and bb.token_grid(h, w, frames) == grid
    kwargs = bb.meta_inputs(1, h, w, 512, frames=frames)
    with Capture(bb, CaptureSpec(sigmas=(0.5,)), batch_size=1, height=h, width=w, frames=frames, planned=True) as cap, \
            torch.device("meta"):
        assert cap.arm([0.5])
        bb.transformer(**kwargs)
        cap.collect()
    assert cap.features.shape == (1, 4, 1, math.prod(grid), width)
