"""Seg4Diff zero-shot segmentation: per-token attention against a by-hand reference, class token lookup,
the background rule, the layer probe, and per-sample quality with the --min-quality filter."""

import json

import numpy as np
import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb

from mmdiff_gen.backbones import wrap_pipeline
from mmdiff_gen.backbones.tiny import build_tiny_sd3
from mmdiff_gen.capture import CaptureSpec, extract
from mmdiff_gen.heads.openseg import OpenSegConfig, class_maps, segment
from mmdiff_gen.heads.quality import agreement, class_confidence, probability_confidence
from mmdiff_gen.jobs.annotate import Annotator, quality_score

CAPTIONS = ["a red circle on the left", "a blue star and a green square"]
CLASSES = ("background", "circle", "square", "star")


def _by_hand(block, kw, family):
    """(B, N, S) image→text attention of one block from its recorded inputs, mean over heads."""
    attn = block.attn
    heads = lambda t: t.unflatten(-1, (attn.heads, -1))  # noqa: E731
    norm = lambda m, t: t if m is None else m(t)  # noqa: E731
    x, txt, temb = kw["hidden_states"], kw["encoder_hidden_states"], kw["temb"]
    s = txt.shape[1]
    if hasattr(block, "norm1_context"):  # joint block
        nx = block.norm1(x, emb=temb)[0]
        nt = block.norm1_context(txt, temb) if getattr(block, "context_pre_only", False) else \
            block.norm1_context(txt, emb=temb)[0]
        q = norm(attn.norm_q, heads(attn.to_q(nx)))
        k = torch.cat([norm(attn.norm_added_k, heads(attn.add_k_proj(nt))), norm(attn.norm_k, heads(attn.to_k(nx)))], 1)
    else:  # FLUX single-stream block over [text; image]
        n = block.norm(torch.cat([txt, x], 1), emb=temb)[0]
        q, k = norm(attn.norm_q, heads(attn.to_q(n)))[:, s:], norm(attn.norm_k, heads(attn.to_k(n)))
        k = torch.cat([k[:, :s], k[:, s:]], 1)
    if family == "flux":
        cos, sin = kw["image_rotary_emb"]
        q = apply_rotary_emb(q, (cos[s:], sin[s:]), sequence_dim=1)
        k = apply_rotary_emb(k, (cos, sin), sequence_dim=1)
    probs = torch.softmax(torch.einsum("bnhd,bmhd->bhnm", q, k) / q.shape[-1] ** 0.5, -1)
    return probs[..., :s].mean(1)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_text_attention_matches_a_by_hand_softmax(tiny, family):
    bb = tiny if family == "flux" else wrap_pipeline(build_tiny_sd3(seed=0), name="tiny-sd3")
    blocks = bb.attention_blocks
    layers = (1, len(blocks) - 1)  # a joint block and the last block (FLUX: single-stream; SD3: context_pre_only)
    seen = {}
    hooks = [blocks[i].register_forward_pre_hook(lambda _m, _a, kw, i=i: seen.__setitem__(i, kw), with_kwargs=True)
             for i in layers]
    try:
        res = extract(bb, torch.rand(2, 3, 64, 64), CaptureSpec(sigmas=(0.5,), layers=(0,), store_dtype="float32",
                                                                text_attention_layers=layers),
                      captions=CAPTIONS, max_sequence_length=16)
    finally:
        for h in hooks:
            h.remove()
    s = 16 if family == "flux" else 77 + 16
    assert res.text_attention.shape == (2, 1, 2, 64, s) and res.text_attention_layers == layers
    for slot, i in enumerate(layers):
        torch.testing.assert_close(res.text_attention[:, 0, slot], _by_hand(blocks[i], seen[i], family),
                                   atol=1e-5, rtol=1e-4)


def test_class_token_positions(tiny):
    assert tiny.class_token_positions(CAPTIONS, CLASSES) == [{1: [2]}, {3: [2], 2: [6]}]
    # Any case, plurals, compound names written apart (VOC's "diningtable"); "category" is not a cat.
    assert tiny.class_token_positions(["Two Stars and a dining table"], ("background", "star", "diningtable")) == \
        [{1: [1], 2: [4, 5]}]
    assert tiny.class_token_positions(["a category"], ("background", "cat")) == [{}]
    assert tiny.class_token_positions(["a blue star"], ("background", "blue star")) == [{1: [1, 2]}]
    sd3 = wrap_pipeline(build_tiny_sd3(seed=0), name="tiny-sd3")
    assert sd3.class_token_positions(CAPTIONS[:1], CLASSES) == [{1: [3]}]  # CLIP: BOS first


def test_class_maps_and_the_background_rule():
    attn = torch.full((1, 16, 4), 0.01)
    attn[0, :4, 1] = 0.5  # token 1 ("circle") looks at the first grid row
    attn[0, 12:, 3] = 0.4  # token 3 ("star") at the last
    maps = class_maps(attn, [{1: [1], 3: [3]}], 4)
    assert torch.isnan(maps[0, 0]).all() and torch.isnan(maps[0, 2]).all()  # background, unnamed class
    ids, score = segment(maps, (4, 4), (4, 4), threshold=0.5)
    assert ids.dtype == torch.uint8 and set(ids[0, 0].tolist()) == {1} and set(ids[0, 3].tolist()) == {3}
    assert set(ids[0, 1:3].flatten().tolist()) == {0} and score.shape == (1, 4, 4)
    with pytest.raises(ValueError, match="background name"):
        OpenSegConfig(classes=("background",), layer=0, sigma=0.5)


def test_quality_signals():
    sure = torch.zeros(1, 3, 4, 4)
    sure[:, 1] = 20
    assert class_confidence(sure).item() == pytest.approx(1.0) and class_confidence(torch.zeros(1, 3, 4, 4)) == pytest.approx(1 / 3)
    assert probability_confidence(torch.zeros(1, 1, 4, 4)).item() == pytest.approx(0.0)
    a = torch.tensor([[[0, 1], [2, 2]]])
    assert agreement(a, a).item() == 1.0 and agreement(a, torch.zeros_like(a)).item() == 0.0
    assert agreement(torch.zeros_like(a), torch.zeros_like(a)).item() == 1.0
    assert quality_score({"seg_confidence": 0.8, "saliency_confidence": 0.6, "agreement": 0.0}) == pytest.approx(0.7)
    assert quality_score({"openseg_confidence": 0.4}) == pytest.approx(0.4) and quality_score({}) is None


def test_openseg_without_heads_and_min_quality_filter(tiny, tmp_path):
    from mmdiff_gen.io.dataset import GeneratedDataset
    from mmdiff_gen.jobs.dataset_job import GenerateJob, run_generate

    g = tiny.default_grounding()
    assert g == {"layer": len(tiny.joint_blocks) - 1, "sigma": 0.52, "threshold": 0.5}
    ann = Annotator({}, tiny.identity(), openseg=OpenSegConfig(classes=CLASSES, layer=2, sigma=0.52),
                    token_positions=tiny.class_token_positions)
    assert ann.tasks == ["openseg"] and ann.spec().text_attention_layers == (2,)
    kw = dict(tasks=("openseg",), images_per_prompt=2, batch_size=4, height=64, width=64, num_inference_steps=4,
              shard_size=4, max_sequence_length=16)
    run_generate(tiny, ann, CAPTIONS, GenerateJob(out=tmp_path / "all", **kw), progress=False)
    scores = sorted(s.meta["quality"]["score"] for s in GeneratedDataset(tmp_path / "all"))
    assert len(scores) == 4 and all(0 <= x <= 1 for x in scores)
    cut = (scores[1] + scores[2]) / 2
    rep = run_generate(tiny, ann, CAPTIONS, GenerateJob(out=tmp_path / "best", min_quality=cut, **kw), progress=False)
    assert (rep.samples_written, rep.samples_filtered) == (2, 2)
    kept = list(GeneratedDataset(tmp_path / "best"))
    # The same view read from the unfiltered run, filtered when loading.
    view = GeneratedDataset(tmp_path / "all", min_quality=cut)
    assert len(view) == 2 and [x.key for x in view] == [x.key for x in kept]
    from mmdiff_gen.io.preview import contact_sheet

    assert contact_sheet(tmp_path / "all", tmp_path / "sheet.png", n=3) == 3  # an openseg column
    assert [s.meta["quality"]["score"] >= cut for s in kept] == [True, True]
    assert set(np.unique(kept[0].labels["openseg"]).tolist()) <= {0, 1, 2, 3}
    stats = json.loads((tmp_path / "best" / "00000_stats.json").read_text())
    assert stats["filtered"] == 2 and sorted(r["status"] for r in stats["samples"]) == ["filtered"] * 2 + ["ok"] * 2
    info = json.loads((tmp_path / "best" / "dataset.json").read_text())
    assert info["openseg"]["classes"] == list(CLASSES) and info["quality"]["min_quality"] == cut
    # Every sample filtered: markers but no (empty) tar, which a schema-inferring reader (HF datasets) cannot
    # read; the dataset reads as empty, verifies, and a re-run has nothing left to do.
    none = GenerateJob(out=tmp_path / "none", min_quality=max(scores) + 1e-6, **kw)
    assert run_generate(tiny, ann, CAPTIONS, none, progress=False).samples_filtered == 4
    assert not list((tmp_path / "none").glob("*.tar")) and len(list((tmp_path / "none").glob("*_stats.json"))) == 1
    assert json.loads((tmp_path / "none" / "sizes.json").read_text()) == {}
    assert list(GeneratedDataset(tmp_path / "none")) == []
    assert run_generate(tiny, ann, CAPTIONS, none, progress=False).shards_written == 0
    from typer.testing import CliRunner

    from mmdiff_gen.cli import app

    assert CliRunner().invoke(app, ["verify", str(tmp_path / "none")]).exit_code == 0


def test_probe_layers_cli(tmp_path):
    from typer.testing import CliRunner

    from mmdiff_gen.cli import app
    from mmdiff_gen.toy.render import write_scenes

    write_scenes(tmp_path / "scenes", 3, seed=0)
    res = CliRunner().invoke(app, ["probe-layers", "--data", str(tmp_path / "scenes"), "--model", "tiny-random",
                                   "--n", "3", "--sigmas", "0.78,0.26", "--json", str(tmp_path / "p.json"),
                                   "--device", "cpu"])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "p.json").read_text())
    assert np.array(rep["miou"]).shape == (6, 2, 4) and rep["samples"] == 3  # 2 double + 4 single blocks
    assert "expert layer: block" in res.output and 0 <= rep["best"]["layer"] < 6
    res = CliRunner().invoke(app, ["probe-layers", "--data", str(tmp_path / "scenes"), "--model", "tiny-random",
                                   "--n", "3", "--classes", "background,dog,cat,car,tree,photo,bird", "--device", "cpu"])
    assert res.exit_code == 1 and "no caption names any of the classes" in res.output
