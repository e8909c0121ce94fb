"""Two-step smoke runs of every phase of the toy recipe, ending in a pipeline folder that loads and generates."""

import json

import numpy as np
import pytest
import torch

from mmdiff_gen.backbones import load_backbone
from mmdiff_gen.backbones.loading import SETTINGS_FILE
from mmdiff_gen.capture import CaptureSpec, generate
from mmdiff_gen.io.state import load_state
from mmdiff_gen.toy.data import render_arrays
from mmdiff_gen.toy.oracle import Oracle
from mmdiff_gen.toy.recipe import ToyRecipe
from mmdiff_gen.toy.train import train_toy
from mmdiff_gen.toy.train_dit import class_map_tokens
from mmdiff_gen.toy.train_text import layout_targets, slot_targets
from mmdiff_gen.toy.world import CLASSES, COLORS, SIZES

SMOKE = ToyRecipe(train_scenes=48, vae_batch=4, text_batch=4, dit_batch=4, oracle_batch=4, dit_warmup=1, sample_steps=4)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("toy")
    out = work / "pipeline"
    times = train_toy(work, SMOKE, phases=["vae", "text", "dit", "export"], steps=2, out=out)
    from mmdiff_gen.toy.data import load_or_render
    from mmdiff_gen.toy.oracle import train_oracle
    from mmdiff_gen.toy.train import _load_vae

    pipe = SMOKE.build_pipeline()
    data = load_or_render(work / "scenes.npz", SMOKE.data_seed, SMOKE.train_scenes)
    _load_vae(pipe.vae, work, data)
    metrics = train_oracle(pipe.vae, data, SMOKE, work, steps=2, out=work / "oracle.safetensors", eval_scenes=4)
    return work, out, times, metrics


def test_phases_checkpoint_and_resume(smoke_run):
    work, _, times, _ = smoke_run
    assert {"data", "vae", "text", "dit"} <= set(times)
    for name in ("vae", "text", "dit", "oracle"):
        assert load_state(work / f"{name}.state.safetensors")["step"] == 2
    # Re-running a finished phase resumes at its last step and does no more work: its state is not rewritten.
    state = work / "vae.state.safetensors"
    before = state.stat().st_mtime_ns
    train_toy(work, SMOKE, phases=["vae"], steps=2)
    assert state.stat().st_mtime_ns == before and load_state(state)["step"] == 2


def test_exported_pipeline_loads_offline_and_generates(smoke_run):
    _, out, _, _ = smoke_run
    settings = json.loads((out / SETTINGS_FILE).read_text())
    assert settings["sampling"]["max_sequence_length"] == SMOKE.t5_max_length
    for tok in ("tokenizer", "tokenizer_2"):  # exported in the process that trained: no padding state leaks
        saved = json.loads((out / tok / "tokenizer.json").read_text())
        assert saved["padding"] is None and saved["truncation"] is None
    bb = load_backbone(str(out), dtype=torch.float32, device="cpu")
    assert bb.default_layers() == (1, 3, 5, 7) and bb.max_sequence_length == SMOKE.t5_max_length
    s = bb.sampling
    gen = generate(bb, ["a large red circle on the left"], CaptureSpec(), seeds=[0], height=s["height"],
                   width=s["width"], num_inference_steps=s["num_inference_steps"], true_cfg_scale=s["true_cfg_scale"],
                   negative_prompt=s["negative_prompt"], output_type="np")
    assert gen.images.shape == (1, 64, 64, 3)
    assert gen.capture.features.shape == (1, 4, 4, 64, 128)


def test_oracle_checkpoint_round_trip(smoke_run):
    work, _, _, metrics = smoke_run
    assert set(metrics) == {"renders", "vae_reconstructions"}
    model = Oracle.from_checkpoint(work / "oracle.safetensors")
    pred = model.predict(np.zeros((2, 64, 64, 3), np.uint8))
    assert pred["seg"].shape == (2, 64, 64) and pred["depth"].min() > 0


def test_recipe_round_trip_and_a_work_folder_keeps_its_recipe(tmp_path):
    assert ToyRecipe.from_dict(json.loads(json.dumps(SMOKE.to_dict()))) == SMOKE
    with pytest.raises(KeyError, match="wingspan"):
        ToyRecipe.from_dict({"wingspan": 3})
    (tmp_path / "recipe.json").write_text(json.dumps(SMOKE.to_dict()))
    # Resuming checkpoints with another architecture would fail deep inside load_state_dict: refuse up front.
    with pytest.raises(ValueError, match="differs in heads"):
        train_toy(tmp_path, ToyRecipe.from_dict({**SMOKE.to_dict(), "heads": 6}), phases=["dit"], steps=2)


def test_layout_targets_and_class_map_tokens_follow_the_labels():
    data = render_arrays(7, 3)
    frac, rgb, present = layout_targets(data, np.arange(3))
    assert frac.shape == (3, len(CLASSES), 16, 16) and rgb.shape == (3, 3, 16, 16)
    torch.testing.assert_close(frac.sum(1), torch.ones(3, 16, 16))
    for row, caption in enumerate(data.captions):
        named = {CLASSES.index(w) - 1 for w in caption.split() if w in CLASSES[1:]}
        assert set(present[row, : len(CLASSES) - 1].nonzero().flatten().tolist()) == named
        assert present[row, len(CLASSES) - 1 :].sum() == len({w for w in caption.split() if w in COLORS})
    # Slots, one per place (left, center, right): class (0: nothing there), colour and size ids.
    slots = slot_targets(["a large red circle on the left and a small blue star on the right"])
    colors, sizes = list(COLORS), list(SIZES)
    assert slots.tolist() == [[[1, colors.index("red"), sizes.index("large")], [0, -100, -100],
                               [4, colors.index("blue"), sizes.index("small")]]]
    # The transformer's probe target: token k holds the class fractions of its 2×2 latent cells (8×8 pixels).
    seg = torch.zeros(1, 64, 64, dtype=torch.uint8)
    seg[0, :8, 8:12] = 2  # left half of the second token of the first row
    tok = class_map_tokens(SMOKE.build_pipeline(), seg, 16, 16)  # (1, 64 tokens, classes, 4 cells)
    assert tok.shape == (1, 64, len(CLASSES), 4)
    torch.testing.assert_close(tok[0, 1, 2], torch.tensor([1.0, 0.0, 1.0, 0.0]))  # cells (0,0),(0,1),(1,0),(1,1)
    assert tok[0, [0, 2, 8], 2].sum() == 0


def test_a_phase_killed_between_checkpoints_resumes_to_the_same_weights(tmp_path):
    from mmdiff_gen.toy._loop import Phase

    def run(work, stop_at=None):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        phase = Phase(work, "p", {"model": model, "opt": opt}, 6, lr=0.1, warmup=2, every=2)
        for step in phase:
            if step == stop_at:
                return None  # killed: steps ≥ the last checkpoint (2) are lost
            x = torch.randn(4, 3, generator=torch.Generator().manual_seed(step))  # data follows the step
            phase.step(model(x).square().mean())
        return model.weight.detach().clone()

    straight = run(tmp_path / "a")
    assert run(tmp_path / "b", stop_at=3) is None and load_state(tmp_path / "b" / "p.state.safetensors")["step"] == 2
    assert torch.equal(run(tmp_path / "b"), straight)
