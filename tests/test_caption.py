"""`caption`: tiny random VLMs built from configs (Gemma 3, and LLaVA-NeXT for prompts of different lengths) and the
toy oracle write the JSONL `--captions` reads; resume, rank split and refusals."""

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mmdiff_gen.backbones.captioner import Captioner
from mmdiff_gen.cli import app
from mmdiff_gen.io.datasets import open_dataset
from mmdiff_gen.jobs.caption import caption_dataset, check_output, part_path, sidecar_path
from mmdiff_gen.toy.render import write_scenes

runner = CliRunner()
WORDS = ("a the red green blue yellow white black small large circle square ring star cross triangle on in of left "
         "right center and image write short prompt").split()
CPU = ["--device", "cpu", "--dtype", "float32"]
HELD_OUT = 5_000_000  # the oracle's held-out seeds (toy/oracle.py)


def _tokenizer(special: list[str], named: dict[str, str], template: str, **tokens):
    """A word-level tokenizer over WORDS, built locally with `tokenizers` (unknown words → <unk>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(special + WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece()  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", extra_special_tokens=named,
                                  chat_template=template, **tokens)
    rest = [t for t in special if t not in tokens.values() and t not in named.values() and t != "<unk>"]
    tok.add_special_tokens({"extra_special_tokens": rest}, replace_extra_special_tokens=False)
    return tok


GEMMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n"
                  "{% for c in m['content'] %}{% if c['type'] == 'image' %}<start_of_image>"
                  "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<end_of_turn>\n{% endfor %}"
                  "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """A 2-layer Gemma 3 VLM (1-layer SigLIP, 32-px images, 4 image tokens) and its processor, saved as safetensors."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tok = _tokenizer(["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                      "<end_of_image>", "<image_soft_token>"],
                     {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                      "image_token": "<image_soft_token>"},
                     GEMMA_TEMPLATE, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    processor = Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": 32, "width": 32}),
                                tokenizer=tok, chat_template=GEMMA_TEMPLATE, image_seq_length=4)
    end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
    cfg = Gemma3Config(
        # a window longer than the prompt: the answer must see the image tokens
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=256,
                         max_position_embeddings=512),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        mm_tokens_per_image=4, boi_token_index=tok.boi_token_id, eoi_token_index=tok.eoi_token_id,
        image_token_index=tok.image_token_id, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(cfg)
    with torch.no_grad():  # initialised to zeros: images would not reach the answer
        model.model.multi_modal_projector.mm_input_projection_weight.normal_()
    # Gemma 3's checkpoints sample (top-k 64, top-p 0.95) and stop at <end_of_turn>; captions must be greedy anyway
    model.generation_config.update(do_sample=True, top_k=64, top_p=0.95, eos_token_id=[tok.eos_token_id, end_of_turn])
    folder = tmp_path_factory.mktemp("gemma3")
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llava_next(tmp_path_factory):
    """A 2-layer LLaVA-NeXT (Llama + 1-layer CLIP): its image token count follows each image's aspect ratio, so one
    batch holds prompts of several lengths and must be padded."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextProcessor)
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
                "{% endfor %}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    tok = _tokenizer(["<eos>", "<bos>", "<unk>", "<image>"], {"image_token": "<image>"}, template,
                     bos_token="<bos>", eos_token="<eos>")  # no pad token, as Llama's: the captioner pads with <eos>
    grid = [[16, 32], [32, 16], [32, 32]]
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                                   image_grid_pinpoints=grid),
        tokenizer=tok, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=template)
    cfg = LlavaNextConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=16, patch_size=8),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        image_token_index=tok.image_token_id, image_grid_pinpoints=grid, vision_feature_select_strategy="default",
        vision_feature_layer=-1)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("llava_next")
    LlavaNextForConditionalGeneration(cfg).save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def renders(tmp_path_factory):
    folder = tmp_path_factory.mktemp("renders")
    write_scenes(folder, 10, seed=HELD_OUT)
    return folder


@pytest.fixture(scope="module", params=["gemma3", "oracle"])
def captioner(request, renders):
    if request.param == "oracle":
        from mmdiff_gen.toy.captioner import OracleCaptioner

        return OracleCaptioner.load()
    return Captioner.load(str(request.getfixturevalue("gemma")), device="cpu", dtype=torch.float32, max_new_tokens=5)


class Counting:
    """A captioner seen through its batches: counts them and, with `fail_at`, dies at that one (a killed run)."""

    def __init__(self, inner, fail_at: int | None = None):
        self.inner, self.fail_at, self.batches = inner, fail_at, 0

    def identity(self):
        return self.inner.identity()

    def __call__(self, images):
        if self.batches == self.fail_at:
            raise KeyboardInterrupt
        self.batches += 1
        return self.inner(images)


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_defaults_are_the_library_s():
    from mmdiff_gen.backbones import captioner
    from mmdiff_gen.cli import caption
    from mmdiff_gen.toy.captioner import ORACLE

    assert (caption.DEFAULT_CAPTIONER, caption.MAX_NEW_TOKENS) == (captioner.DEFAULT_MODEL, captioner.MAX_NEW_TOKENS)
    assert ORACLE == "oracle"


def test_caption_writes_a_line_per_image_that_captions_read_back(gemma, renders, tmp_path):
    caps = tmp_path / "caps.jsonl"
    args = ["caption", "--data", str(renders), "--out", str(caps), "--model", str(gemma), "--batch-size", "4",
            "--max-new-tokens", "5", *CPU]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    ds = open_dataset(renders)
    rows = _rows(caps)
    assert [r["key"] for r in rows] == ds.keys and all(set(r) == {"key", "caption"} for r in rows)
    assert all(r["caption"] and "\n" not in r["caption"] for r in rows)
    side = json.loads(sidecar_path(caps).read_text())["captioner"]
    assert side["model"] == str(gemma) and side["max_new_tokens"] == 5 and side["prompt"].startswith("Write a short")
    read = open_dataset(renders, captions=caps)
    assert [read[i].caption for i in range(len(read))] == [r["caption"] for r in rows]
    before = caps.read_bytes()
    res = runner.invoke(app, args)  # a finished file: nothing to do, nothing rewritten
    assert res.exit_code == 0 and "0 image(s) captioned now, 10 already were" in " ".join(res.output.split())
    assert caps.read_bytes() == before


def test_batched_generation_pads_on_the_left_and_equals_one_image_at_a_time(llava_next):
    from mmdiff_gen.toy.world import render_scene

    cap = Captioner.load(str(llava_next), device="cpu", dtype=torch.float32, max_new_tokens=6)
    images = [render_scene(0).image, np.ascontiguousarray(render_scene(1).image[:, :28]),
              np.zeros((40, 16, 3), np.uint8), np.full((16, 40, 3), 255, np.uint8)]
    lengths = [len(cap.processor(text=["<image>"], images=[[im]])["input_ids"][0]) for im in images]
    assert len(set(lengths)) > 1  # the batch really is padded
    alone = [cap([im])[0] for im in images]
    assert cap(images) == alone
    cap.processor.tokenizer.padding_side = "right"  # what padding on the left prevents: the test can tell
    assert cap(images) != alone


def test_a_killed_run_resumes_to_what_one_uninterrupted_run_writes(captioner, renders, tmp_path):
    ds = open_dataset(renders)
    whole = tmp_path / "whole.jsonl"
    caption_dataset(captioner, ds, whole, batch_size=3)
    reference = whole.read_bytes()
    assert len(reference.splitlines()) == len(ds)

    caps = tmp_path / "caps.jsonl"
    with pytest.raises(KeyboardInterrupt):  # killed in its third batch of four
        caption_dataset(Counting(captioner, fail_at=2), ds, caps, batch_size=3)
    assert caps.read_bytes() == reference[:sum(len(x) for x in reference.splitlines(keepends=True)[:6])]
    with open(caps, "ab") as f:  # … and in the middle of writing its line
        f.write(reference.splitlines(keepends=True)[6][:20])
    again = Counting(captioner)
    run = caption_dataset(again, ds, caps, batch_size=3)
    assert caps.read_bytes() == reference and again.batches == 2 and run.written == 4

    lines = reference.splitlines(keepends=True)  # lines lost from the middle; the last row without its newline
    caps.write_bytes(b"".join(lines[:1] + lines[2:4] + lines[5:9]) + lines[9].rstrip(b"\n"))
    again = Counting(captioner)
    caption_dataset(again, ds, caps, batch_size=3)
    assert caps.read_bytes() == reference and again.batches == 2  # batches 0 and 1 redone whole, no line twice


def test_workers_split_batches_and_assemble_what_one_process_writes(captioner, renders, tmp_path):
    ds = open_dataset(renders)
    one = tmp_path / "one.jsonl"
    caption_dataset(captioner, ds, one, batch_size=3)
    caps = tmp_path / "caps.jsonl"
    with pytest.raises(TimeoutError, match="has a worker stopped"):  # worker 1 has not run: worker 0 gives up
        caption_dataset(captioner, ds, caps, batch_size=3, rank=0, world_size=2, stall_s=0.2, poll_s=0.05)
    assert not caps.exists() and len(_rows(part_path(caps, 0, 2))) == 6  # batches 0 and 2
    r1 = caption_dataset(captioner, ds, caps, batch_size=3, rank=1, world_size=2)
    assert (r1.owned, r1.written, r1.assembled) == (4, 4, False) and not caps.exists()
    r0 = caption_dataset(Counting(captioner), ds, caps, batch_size=3, rank=0, world_size=2, poll_s=0.05)
    assert r0.written == 0 and r0.assembled  # its part was kept: nothing captioned again
    assert caps.read_bytes() == one.read_bytes()
    assert not part_path(caps, 0, 2).exists() and not part_path(caps, 1, 2).exists()


def test_oracle_captions_in_the_world_s_words(renders, tmp_path):
    from mmdiff_gen.toy.captioner import OracleCaptioner, read_caption
    from mmdiff_gen.toy.world import render_scene

    scenes = [render_scene(HELD_OUT + 100 + i) for i in range(24)]
    exact = np.mean([read_caption(s.image, s.seg, s.depth) == s.caption for s in scenes])
    read = OracleCaptioner.load()([s.image for s in scenes])
    agree = np.mean([r == s.caption for r, s in zip(read, scenes)])
    assert exact >= 0.9 and agree >= 0.75, (exact, agree)  # 0.99 and 0.97 on 500 held-out renders

    caps = tmp_path / "caps.jsonl"
    res = runner.invoke(app, ["caption", "--data", str(renders), "--out", str(caps), "--model", "oracle",
                              "--device", "cpu", "--rank", "0", "--world-size", "1"])
    assert res.exit_code == 0, res.output
    truth = {json.loads(m)["key"]: json.loads(m)["caption"] for m in (renders / "meta.jsonl").read_text().splitlines()}
    rows = _rows(caps)
    assert [r["key"] for r in rows] == list(truth)
    assert np.mean([r["caption"] == truth[r["key"]] for r in rows]) >= 0.7


def test_captions_of_another_captioner_are_never_mixed_in(gemma, renders, tmp_path):
    caps = tmp_path / "caps.jsonl"
    base = ["caption", "--data", str(renders), "--out", str(caps), "--model", str(gemma), "--max-new-tokens", "3", *CPU]
    assert runner.invoke(app, base).exit_code == 0
    before = caps.read_bytes()
    for extra, what in ((["--prompt", "Name the objects."], "prompt"), (["--max-new-tokens", "4"], "max_new_tokens")):
        res = runner.invoke(app, base + extra)
        assert res.exit_code == 1 and what in res.output and "never mixed" in res.output, res.output
        assert len([ln for ln in res.output.splitlines() if ln.strip()]) == 1
    res = runner.invoke(app, ["caption", "--data", str(renders), "--out", str(caps), "--model", "oracle"])
    assert res.exit_code == 1 and "model" in res.output
    assert caps.read_bytes() == before
    foreign = tmp_path / "mine.jsonl"
    foreign.write_text('{"key": "x", "caption": "by hand"}\n')
    res = runner.invoke(app, ["caption", "--data", str(renders), "--out", str(foreign), "--model", "oracle"])
    assert res.exit_code == 1 and "no mine.jsonl.json" in res.output
    claimed = tmp_path / "claimed.jsonl"  # a run that claimed its file and died before its first line
    check_output(claimed, {"model": "a"}, claim=True)
    check_output(claimed, {"model": "a"})
    with pytest.raises(ValueError, match="no caption yet .delete claimed.jsonl.json to start over"):
        check_output(claimed, {"model": "b"}, claim=True)


def test_bad_data_or_a_missing_model_is_one_line_and_a_nonzero_exit(gemma, renders, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = ["--out", str(tmp_path / "caps.jsonl")]
    bad = tmp_path / "pickled"
    shutil.copytree(gemma, bad)
    (bad / "model.safetensors").unlink()
    (bad / "pytorch_model.bin").write_bytes(b"not read: a pickle is never loaded")
    for args, says, code in (
        (["--data", "nope:" + str(renders)], "unknown dataset kind 'nope'", 2),
        (["--data", "folder:" + str(tmp_path / "missing")], "no such folder", 2),
        (["--data", str(renders), "--model", "google/gemma-3-4b-it"], "hf download google/gemma-3-4b-it", 2),
        (["--data", str(renders), "--model", str(tmp_path)], "no config.json", 2),
        (["--data", str(renders), "--model", str(bad)], "pytorch_model.bin is a pickle", 2),
        (["--data", str(renders), "--model", "oracle", "--prompt", "hi"], "takes no prompt", 2),
        (["--data", str(renders), "--batch-size", "0"], "must be ≥ 1", 2),
        (["--model", "oracle"], "--data is required", 2),
    ):
        res = runner.invoke(app, ["caption", *out, *args, "--device", "cpu"])
        assert res.exit_code == code and says in " ".join(res.output.split()), (args, res.output)
        assert len([ln for ln in res.output.splitlines() if ln.strip()]) == 1, res.output
    assert not (tmp_path / "caps.jsonl").exists() and not sidecar_path(tmp_path / "caps.jsonl").exists()
