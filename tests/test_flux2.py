"""What only FLUX.2 has, beyond the family contract (test_families.py): the 4-step distilled [klein] (its sampling
defaults, its one-extra-forward contract, capture in it, `inspect`), joint-block features, [dev]'s defaults at its
released config."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import Flux2Transformer2DModel

from _families import Recorder
from mmdiff_gen.backbones import Flux2Backbone, wrap_pipeline
from mmdiff_gen.backbones.flux2 import FLUX2_DEV
from mmdiff_gen.backbones.tiny import build_tiny_flux2
from mmdiff_gen.capture import CaptureSpec, extract, generate, plan_schedule
from mmdiff_gen.capture._noise import generators_for

PROMPTS = ["a red circle on the left", "a small blue star"]
SEEDS = [3, 4]
KW = dict(height=64, width=64, num_inference_steps=6, max_sequence_length=16)


@pytest.fixture(scope="module")
def klein():
    return wrap_pipeline(build_tiny_flux2(seed=0), name="tiny-flux2")


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


def test_distilled_images_bit_identical_with_concepts_and_features_are_the_block_outputs(klein):
    spec = CaptureSpec(layers=(1, 3), store_dtype="float32", sigmas=(0.9, 0.001), concepts=("object", "edges"),
                       cross_attention=True)
    kw = {**KW, "num_inference_steps": 4}
    rec = Recorder(klein.transformer, klein.feature_blocks, 64)
    try:
        ours = generate(klein, PROMPTS, spec, seeds=SEEDS, guidance_scale=1.0, output_type="np", **kw)
    finally:
        rec.close()
    plan = plan_schedule(klein, spec, 4, 64, 64)
    plain = klein.pipe(prompt=PROMPTS, generator=generators_for(SEEDS), sigmas=list(plan.pipeline_sigmas),
                       guidance_scale=1.0, output_type="np", **kw).images
    assert np.array_equal(ours.images, plain)
    assert len(rec.timesteps) == 4 + 1 and plan.extra == (0.001,)  # distilled: no CFG call, one extra forward
    for j, target in enumerate(spec.sigmas):
        call = next(k for k, t in enumerate(rec.timesteps) if abs(float(t[0]) - target) < 1e-6)
        for slot, layer in enumerate(ours.capture.layers):
            assert torch.equal(ours.capture.features[:, slot, j], rec.outputs[call][layer])


def test_joint_block_features_are_the_double_stream_image_outputs(klein):
    spec = CaptureSpec(layers=(0, 1), blocks="joint", store_dtype="float32", sigmas=(0.52,))
    seen = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: seen.append(out[1].clone())) for b in klein.joint_blocks]
    try:
        res = extract(klein, torch.rand(2, 3, 64, 64), spec, captions=PROMPTS, seeds=[5, 6], max_sequence_length=16)
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(res.features[:, 0, 0], seen[0]) and torch.equal(res.features[:, 1, 0], seen[1])


def test_flux2_dev_defaults_on_meta():
    with torch.device("meta"):
        transformer = Flux2Transformer2DModel(**FLUX2_DEV)
    # FLUX.2's VAE (AutoencoderKLFlux2) has 4 block widths: scale factor 8; the pipelines patchify 2×2.
    dev = Flux2Backbone(SimpleNamespace(transformer=transformer, vae_scale_factor=8), name="FLUX.2-dev")
    assert dev.default_layers(blocks="joint") == (1, 3, 5, 7)
    assert (dev.sampling_kwargs()["num_inference_steps"], dev.sampling_kwargs()["guidance_scale"]) == (50, 4.0)


def test_inspect_reads_a_distilled_klein_at_its_own_sigma(klein, tmp_path):
    from typer.testing import CliRunner

    from mmdiff_gen.cli import app

    klein.pipe.save_pretrained(tmp_path / "klein")
    res = CliRunner().invoke(app, ["inspect", "--model", str(tmp_path / "klein"), "--size", "64"])
    assert res.exit_code == 0, res.output
    assert "4 sampler steps + 1 extra" in res.output and "0.78" not in res.output
    res = CliRunner().invoke(app, ["inspect", "--model", str(tmp_path / "klein"), "--size", "64", "--sigmas", "0.5,0.2"])
    assert res.exit_code == 1 and res.output.count("\n") == 1 and "never samples below" in res.output, res.output


def test_a_concept_token_is_the_words_even_where_the_template_repeats_it(klein):
    """The word's place comes from the template's opening, never from searching the text: Qwen3's generation prompt
    closes with `<|im_start|>assistant`, which holds "star", "art", "ant"…"""
    tok = klein.pipe.tokenizer
    template = tok.chat_template
    tok.chat_template = template + " assistant star"
    try:
        klein._concept_tokens.clear()
        got = klein.encode_concepts(("star",))
        text = klein._templated("star")  # "star assistant star"
        embeds = klein.pipe._get_qwen3_prompt_embeds(klein.pipe.text_encoder, tok, ["star"],
                                                     max_sequence_length=len(tok(text).input_ids))
        torch.testing.assert_close(got, klein.transformer.context_embedder(embeds[0, :1]))  # the first token's
    finally:
        tok.chat_template = template
        klein._concept_tokens.clear()
