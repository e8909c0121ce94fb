"""The contract every backbone family passes, one parametrised module: FLUX.1, SD3.5, FLUX.2 [klein] (base), FLUX.2
[dev] and Qwen-Image, each a tiny pipeline built from configs (random weights, 64×64 images = 8×8 image tokens).

Images bit-identical with capture on and off under each family's own guidance; the sigmas received are the
contract's; features are the blocks' outputs; real-image mode is one forward at x_σ; concept and image→text
attention maps equal a hand-written reference block (`_families.py`); heads train on the features and annotate a
generate job; heads of another family are refused; a saved folder is recognised from model_index.json, loaded,
built on the meta device and inspected; the GPU policy (float16, compile, offload, fp8 storage, LoRA) holds.
"""

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from _families import FAMILIES
from _helpers import make_heads
from mmdiff_gen.backbones import wrap_pipeline
from mmdiff_gen.capture import CaptureSpec, compile_backbone, extract, generate, plan_schedule
from mmdiff_gen.capture._noise import generators_for
from mmdiff_gen.capture.concepts import concept_map

PROMPTS = ["a red circle on the left", "a small blue star"]  # different lengths: Qwen-Image pads and masks
SEEDS = [3, 4]
KW = dict(height=64, width=64, num_inference_steps=6, max_sequence_length=16)
N_TOKENS = 64


@pytest.fixture(scope="module", params=list(FAMILIES))
def fam(request):
    f = FAMILIES[request.param]
    return f, wrap_pipeline(f.build(), name=f"tiny-{f.name}")


def test_the_adapter_and_the_block_outputs_it_reads(fam, recorder):
    from mmdiff_gen.backbones.loading import _adapter_for

    f, bb = fam
    assert _adapter_for(f.pipeline) is f.adapter and bb.identity()["family"] == f.family
    assert bb.pixels_per_token == 8 and bb.token_grid(64, 64) == (8, 8)
    # diffusers 0.42's block outputs, as the recorder reads them independently of the adapter.
    rec = recorder(bb.transformer, bb.feature_blocks, N_TOKENS)
    x0 = bb.encode_images(torch.zeros(1, 3, 64, 64))
    bb.transformer(**bb.transformer_inputs(x0, torch.full((1,), 0.5), bb.encode_prompts(PROMPTS[:1], 16), 3.5, 64, 64))
    assert [rec.outputs[-1][i].shape for i in range(len(bb.feature_blocks))] == \
        [(1, N_TOKENS, bb.feature_dim)] * len(bb.feature_blocks)


def test_images_bit_identical_the_contract_sigmas_and_the_block_outputs(fam, recorder):
    f, bb = fam
    spec = CaptureSpec(layers=(1, 3), concepts=("object", "edges"), cross_attention=True, text_attention_layers=(1,),
                       store_dtype="float32")
    rec = recorder(bb.transformer, bb.feature_blocks, N_TOKENS)
    ours = generate(bb, PROMPTS, spec, seeds=SEEDS, output_type="np", **f.cfg, **KW)
    calls = list(rec.timesteps)
    plan = plan_schedule(bb, spec, KW["num_inference_steps"], 64, 64)
    plain = bb.pipe(prompt=PROMPTS, generator=generators_for(SEEDS), sigmas=list(plan.pipeline_sigmas),
                    output_type="np", **f.cfg, **KW).images
    assert np.array_equal(ours.images, plain)
    cap = ours.capture
    assert cap.features.shape == (2, 2, 4, N_TOKENS, bb.feature_dim)
    assert torch.allclose(cap.sigmas, torch.tensor([spec.sigmas] * 2), atol=1e-6, rtol=0)
    assert len(calls) == f.cfg_calls * KW["num_inference_steps"] + len(plan.extra) and 0.001 in plan.extra
    for j, target in enumerate(spec.sigmas):
        # The conditional call (first at its sigma), or the conditional half of SD3's [uncond; cond] rows.
        call = next(k for k, t in enumerate(calls) if abs(float(t[0]) / f.timestep_scale - target) < 1e-6)
        for slot, layer in enumerate(cap.layers):
            out = rec.outputs[call][layer]
            assert torch.equal(cap.features[:, slot, j], out[-2:])
    torch.testing.assert_close(cap.concept_maps.sum(2), torch.ones(2, 4, N_TOKENS))
    assert cap.cross_attention.shape == (2, 4, N_TOKENS) and torch.all(cap.cross_attention > 0)
    assert cap.text_attention.shape[:4] == (2, 4, 1, N_TOKENS)


def test_real_image_mode_is_one_forward_at_x_sigma(fam, recorder):
    f, bb = fam
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    res = extract(bb, images, CaptureSpec(layers=(0, 2), store_dtype="float32"), captions=PROMPTS, seeds=[5, 6],
                  max_sequence_length=16)
    assert res.features.shape == (2, 2, 4, N_TOKENS, bb.feature_dim)
    # One sigma by hand: x_σ = (1 − σ)·x0 + σ·ε, the image's own noise draw, through the transformer.
    x0 = bb.encode_images(images * 2 - 1)
    noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in generators_for([5, 6])])
    rec = recorder(bb.transformer, bb.feature_blocks, N_TOKENS)
    cond = bb.encode_prompts(PROMPTS, 16)
    bb.transformer(**bb.transformer_inputs((1 - 0.52) * x0 + 0.52 * noise, torch.full((2,), 0.52), cond,
                                           bb.sampling_kwargs()["guidance_scale"], 64, 64))
    assert torch.allclose(rec.timesteps[-1], torch.full((2,), 0.52 * f.timestep_scale))
    torch.testing.assert_close(res.features[:, 1, 1], rec.outputs[-1][2], atol=1e-5, rtol=1e-5)


def test_concept_and_text_attention_maps_equal_the_reference_block(fam):
    f, bb = fam
    words, layers = ("object", "background", "edges"), f.concept_layers
    spec = CaptureSpec(sigmas=(0.6,), concepts=words, concept_layers=layers, text_attention_layers=layers,
                       store_dtype="float32")
    seen, call = {}, {}
    hooks = [blk.register_forward_pre_hook(lambda _m, _a, kw, i=i: seen.__setitem__(i, kw), with_kwargs=True)
             for i, blk in enumerate(bb.joint_blocks)]
    hooks.append(bb.transformer.register_forward_pre_hook(lambda _m, _a, kw: call.update(kw), with_kwargs=True))
    try:
        res = extract(bb, torch.rand(2, 3, 64, 64), spec, captions=PROMPTS, max_sequence_length=16)
    finally:
        for h in hooks:
            h.remove()
    c = bb.encode_concepts(words).unsqueeze(0).expand(2, -1, -1)
    temb_c = bb.concept_temb(call["timestep"], call.get("guidance"), bb.dtype)
    maps = 0
    for i in range(max(layers) + 1):
        ref = f.reference(bb.joint_blocks[i], seen[i], c, temb_c)
        c = ref["c"]
        if i in layers:
            maps = maps + concept_map(ref["o_x"], ref["o_c"]) / len(layers)
            slot = sorted(layers).index(i)
            torch.testing.assert_close(res.text_attention[:, 0, slot], ref["p_text"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(res.concept_maps[:, 0], maps.transpose(1, 2), atol=1e-5, rtol=1e-4)


def test_openseg_finds_each_class_word_among_the_text_tokens_the_transformer_sees(fam):
    f, bb = fam
    prompt = "a small blue star and two red circles"
    (found,) = bb.class_token_positions([prompt], ["background", "star", "circle", "dog"])
    ids, tok = f.text_ids(bb.pipe, prompt), bb.grounding_tokenizer()[0]
    assert set(found) == {1, 2}  # "dog" is not named; the plural "circles" is the circle's
    for c, word in ((1, "star"), (2, "circles")):
        assert [ids[p] for p in found[c]] == tok(word, add_special_tokens=False).input_ids


def test_probe_layers_scores_every_attention_block(fam, tmp_path):
    """Seg4Diff's layer search (`probe-layers`): every attention block × sigma × threshold scored as zero-shot
    segmentation from the class words' attention, on two toy scenes."""
    from mmdiff_gen.io.readers import FilesDataset
    from mmdiff_gen.jobs.probe import describe_layer, probe_layers
    from mmdiff_gen.toy.render import write_scenes
    from mmdiff_gen.toy.world import CLASSES

    f, bb = fam
    write_scenes(tmp_path, 2, seed=0)
    res = probe_layers(bb, FilesDataset(tmp_path), list(CLASSES), sigmas=(0.78, 0.52), thresholds=(0.4, 0.6),
                       batch_size=2)
    n = len(bb.attention_blocks)
    assert res["miou"].shape == (n, 2, 2) and np.isfinite(res["miou"]).all() and res["samples"] == 2
    assert 0 <= res["best"]["layer"] < n and describe_layer(bb, n - 1).split()[0] in ("double", "joint", "single")


def test_heads_train_on_its_features_and_annotate_a_generate_job(fam, tmp_path):
    """Cache → train → load → generate job: the FLUX head path unchanged, with the family's guidance."""
    from mmdiff_gen.io.dataset import GeneratedDataset
    from mmdiff_gen.io.readers import FilesDataset
    from mmdiff_gen.jobs.annotate import Annotator, head_files
    from mmdiff_gen.jobs.dataset_job import GenerateJob, run_generate
    from mmdiff_gen.toy.render import write_scenes
    from mmdiff_gen.toy.world import CLASSES
    from mmdiff_gen.train.feature_cache import FeatureCache, build_cache
    from mmdiff_gen.train.trainer import TrainConfig, train_head

    f, bb = fam
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
                      num_inference_steps=6, shard_size=4, seed=1, **f.cfg)
    report = run_generate(bb, annotator, PROMPTS, job, progress=False)
    assert report.samples_written == 2 and report.samples_failed == 0
    seg = next(iter(GeneratedDataset(tmp_path / "out"))).labels["seg"]
    assert seg.shape == (64, 64) and set(np.unique(seg).tolist()) <= set(range(len(CLASSES)))


def test_heads_of_another_family_are_refused(fam, tiny, tmp_path):
    from mmdiff_gen.heads.checkpoint import HeadMismatch, load_head

    f, bb = fam
    other = tiny if f.family != "flux" else wrap_pipeline(FAMILIES["sd3"].build(), name="tiny-sd3")
    make_heads(bb, tmp_path, tasks=("seg",))
    with pytest.raises(HeadMismatch, match=rf"trained on 'tiny-{f.name}' \({f.family},"):
        load_head(tmp_path / "seg.safetensors", backbone=other.identity())


def test_a_saved_folder_is_recognised_loaded_built_on_meta_and_inspected(fam, tmp_path):
    from mmdiff_gen.backbones import load_backbone
    from mmdiff_gen.backbones.loading import adapter_class, meta_backbone
    from mmdiff_gen.cli import app

    f, bb = fam
    folder = tmp_path / f.name
    bb.pipe.save_pretrained(folder)
    assert adapter_class(str(folder)) is f.adapter  # from model_index.json, nothing loaded
    loaded = load_backbone(str(folder), dtype=torch.float32, device="cpu")
    meta = meta_backbone(str(folder))
    for b in (loaded, meta):
        assert type(b) is f.adapter and b.identity()["config_sha256"] == bb.identity()["config_sha256"]
        assert (b.feature_dim, b.pixels_per_token, b.default_layers()) == (bb.feature_dim, 8, bb.default_layers())
    res = CliRunner().invoke(app, ["inspect", "--model", str(folder), "--size", "64", "--steps", "6"])
    assert res.exit_code == 0 and f"({f.family})" in res.output and "8×8 = 64" in res.output, res.output


def test_float16_is_refused_where_the_family_overflows(fam):
    from mmdiff_gen.backbones.flops import config_backbone

    f, bb = fam
    half = config_backbone(f.adapter, type(bb.transformer).__name__, dict(bb.transformer.config), vae_scale_factor=4,
                           name="half")
    half.transformer.to(torch.float16)
    if f.adapter.FLOAT16_OK:
        half.check_capture()
    else:
        with pytest.raises(ValueError, match="overflows float16"):
            half.check_capture()


def test_compiled_equals_eager(fam):
    """torch.compile with capture's hooks inside (aot_eager: dynamo's tracing and guards), by blocks where the
    transformer declares its repeated blocks, else whole (SD3: refused by blocks in one line)."""
    import torch._dynamo

    f, _ = fam
    bb = wrap_pipeline(f.build(), name=f"tiny-{f.name}")
    spec = CaptureSpec(layers=(0, 3), concepts=("object",), cross_attention=True, store_dtype="float32")
    kw = dict(output_type="np", **KW, **f.cfg)
    eager = generate(bb, PROMPTS, spec, seeds=SEEDS, **kw)
    mode = "blocks" if bb.transformer._repeated_blocks else "transformer"
    if mode == "transformer":
        with pytest.raises(ValueError, match="declares no repeated blocks"):
            compile_backbone(bb, "blocks", backend="aot_eager")
    torch._dynamo.reset()
    try:
        compile_backbone(bb, mode, backend="aot_eager")
        ours = generate(bb, PROMPTS, spec, seeds=SEEDS, **kw)
    finally:
        torch._dynamo.reset()
    assert np.array_equal(ours.images, eager.images)
    for name in ("features", "concept_maps", "cross_attention"):
        torch.testing.assert_close(getattr(ours.capture, name), getattr(eager.capture, name), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("offload, storage", [("model", "full"), ("group", "full"), ("none", "fp8"), ("none", "int8")])
def test_offload_and_quantized_storage_capture_as_resident(fam, offload, storage):
    """Model / leaf-level group offload: bit-identical; fp8 (layerwise-cast) and int8 (torchao weight-only) storage:
    close to full precision."""
    from mmdiff_gen.backbones.runtime import apply_runtime

    f, bb = fam
    spec = CaptureSpec(layers=(0, 3), concepts=("object",), store_dtype="float32")
    kw = dict(output_type="np", **KW, **f.cfg)
    ref = generate(bb, PROMPTS, spec, seeds=SEEDS, **kw)
    pipe = f.build()
    apply_runtime(pipe, offload=offload, storage=storage, dtype=torch.float32, device="cpu")
    ours = generate(wrap_pipeline(pipe, name=f"tiny-{f.name}"), PROMPTS, spec, seeds=SEEDS, **kw)
    if storage == "full":
        assert np.array_equal(ours.images, ref.images)
        assert torch.equal(ours.capture.features, ref.capture.features)
        assert torch.equal(ours.capture.concept_maps, ref.capture.concept_maps)
    else:
        rel = (ours.capture.features - ref.capture.features).norm() / ref.capture.features.norm()
        assert 0 < rel < 0.25, float(rel)


def test_a_lora_changes_the_features_and_enters_the_identity(fam, tmp_path):
    """A LoRA on the transformer's attention, saved as diffusers does and loaded through `load_lora`: capture's hooks
    move onto the adapted projections and the identity (what heads check) names it."""
    from peft import LoraConfig, get_peft_model_state_dict

    from mmdiff_gen.backbones.loading import load_lora

    f, bb = fam
    spec = CaptureSpec(layers=(0, 3), concepts=("object",), store_dtype="float32")
    kw = dict(output_type="np", **KW, **f.cfg)
    before = generate(bb, PROMPTS, spec, seeds=SEEDS, **kw)
    donor = f.build()
    donor.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "add_k_proj"]))
    with torch.no_grad():  # peft starts B at zero (a no-op adapter): a trained one is not
        for name, p in donor.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    type(donor).save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(donor.transformer))
    pipe = f.build()
    load_lora(pipe, tmp_path, scale=1.0, name="style")
    adapted = wrap_pipeline(pipe, name=f"tiny-{f.name}")
    after = generate(adapted, PROMPTS, spec, seeds=SEEDS, **kw)
    assert [x["name"] for x in adapted.identity()["lora"]] == ["style"] and "lora" not in bb.identity()
    assert not torch.allclose(after.capture.features, before.capture.features)
    pipe.set_adapters(["style"], adapter_weights=[0.0])  # scale 0: the base model's features again
    again = generate(adapted, PROMPTS, spec, seeds=SEEDS, **kw)
    torch.testing.assert_close(again.capture.features, before.capture.features, atol=1e-5, rtol=1e-5)


REAL = {  # family: (module constant, transformer class, feature blocks, joint blocks, width, layers, concept layers)
    "flux": ("flux.FLUX_DEV", "FluxTransformer2DModel", 38, 19, 3072, (4, 15, 26, 37), (15, 16, 17, 18)),
    "sd3": ("sd3.SD35_LARGE", "SD3Transformer2DModel", 38, 38, 2432, (4, 15, 26, 37), tuple(range(30, 38))),
    "flux2": ("flux2.FLUX2_DEV", "Flux2Transformer2DModel", 48, 8, 6144, (5, 19, 33, 47), (6, 7)),
    "qwenimage": ("qwenimage.QWEN_IMAGE", "QwenImageTransformer2DModel", 60, 60, 3072, (6, 24, 41, 59),
                  tuple(range(47, 60))),
}


@pytest.mark.parametrize("name", list(REAL))
def test_the_real_config_on_the_meta_device(name):
    """FLUX.1-dev, SD3.5-large, FLUX.2-dev and Qwen-Image as released (their transformer/config.json), no weights:
    block counts, width, default layers, token grids (16 px per token), and the features capture takes at 1024²."""
    import importlib

    from mmdiff_gen.backbones.flops import config_backbone
    from mmdiff_gen.capture import Capture

    const, cls, n_feat, n_joint, width, layers, concepts = REAL[name]
    module, attr = const.split(".")
    config = getattr(importlib.import_module(f"mmdiff_gen.backbones.{module}"), attr)
    bb = config_backbone(FAMILIES[name].adapter, cls, config, vae_scale_factor=8, name=attr)
    assert (len(bb.feature_blocks), len(bb.joint_blocks), bb.feature_dim) == (n_feat, n_joint, width)
    assert bb.default_layers() == layers and bb.default_concept_layers() == concepts
    assert bb.pixels_per_token == 16 and bb.token_grid(512, 512) == (32, 32) and bb.token_grid(1024, 768) == (64, 48)
    with pytest.raises(ValueError, match="multiples of 16"):
        bb.token_grid(500, 512)
    kwargs = bb.meta_inputs(1, 1024, 1024, 64)
    with Capture(bb, CaptureSpec(sigmas=(0.5,)), batch_size=1, height=1024, width=1024, planned=True) as cap, \
            torch.device("meta"):
        assert cap.arm([0.5])
        bb.transformer(**kwargs)
        cap.collect()
    assert cap.features.shape == (1, 4, 1, 4096, width) and cap.features.dtype == torch.bfloat16
