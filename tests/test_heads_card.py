"""A heads folder as a Hub model repo: its generated config.json and model card, `heads card`, and `--heads org/name`
read from a Hugging Face cache laid out as huggingface_hub lays it out."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import constants, scan_cache_dir
from huggingface_hub.file_download import repo_folder_name
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mmdiff_gen.backbones.loading import DEFAULT_HEADS, hub_snapshot, load_backbone
from mmdiff_gen.cli import app
from mmdiff_gen.cli.heads import _refresh_card
from mmdiff_gen.heads.card import REPO_FILES, heads_config, write_card
from mmdiff_gen.heads.checkpoint import read_meta
from mmdiff_gen.jobs.annotate import plan_annotator, resolve_heads
from mmdiff_gen.toy.render import write_scenes
from mmdiff_gen.toy.world import CLASSES
from mmdiff_gen.train.feature_cache import extract_dataset

from _helpers import make_heads

run = CliRunner().invoke
TRAIN = {"cache": "/c/train", "data": "voc:/data/VOC2012 train_aug", "samples": 10582, "steps": 6620,
         "config": {"epochs": 20, "batch_size": 32, "lr": 1e-4},
         "eval": {"cache": "/c/val", "data": "voc:/data/VOC2012 val", "samples": 1449}}
METRICS = {"seg": {"miou": 81.25, "iou": [90.0, 72.5], "train": TRAIN},
           "depth": {"abs_rel": 0.0712, "d1": 0.951, "train": {"cache": "/c/old", "samples": 50}}}  # an older record


@pytest.fixture(scope="module")
def tiny_bb():
    return load_backbone("tiny-random", dtype=torch.float32, device="cpu")


@pytest.fixture
def heads(tiny_bb, tmp_path):
    return make_heads(tiny_bb, tmp_path / "heads", tasks=("seg", "depth"), metrics=METRICS)


def _front_matter(readme: Path) -> tuple[dict, str]:
    _, front, body = readme.read_text().split("---\n", 2)
    return yaml.safe_load(front), body


def _edit_backbone(path: Path, **changes) -> None:
    """Rewrite the backbone identity a head file records (its weights unchanged)."""
    with safe_open(str(path), "pt") as f:
        header = dict(f.metadata())
    meta = json.loads(header["meta"])
    meta["backbone"].update(changes)
    header["meta"] = json.dumps(meta)
    save_file(load_file(str(path)), str(path), metadata=header)


def test_card_and_config_say_what_the_head_files_record(heads, tiny_bb):
    paths = write_card(heads)
    assert paths == [heads / "config.json", heads / "README.md"]
    cfg = json.loads((heads / "config.json").read_text())
    assert cfg["library_name"] == "mmdiff-gen" and cfg["license"] == "other" and cfg["base_model"] is None
    assert cfg["backbone"] == tiny_bb.identity()
    assert cfg["capture"]["layers"] == list(tiny_bb.default_layers()) and cfg["capture"]["blocks"] == ["feature"]
    seg, depth = cfg["heads"]["seg.safetensors"], cfg["heads"]["depth.safetensors"]
    assert seg["tasks"] == ["seg"] and seg["classes"] == list(CLASSES) and len(seg["palette"]) == len(CLASSES)
    assert seg["training"]["data"] == "voc:/data/VOC2012 train_aug" and seg["training"]["steps"] == 6620
    assert seg["evaluation"] == {**TRAIN["eval"], "metrics": {"seg": {"miou": 81.25, "iou": [90.0, 72.5]}}}
    assert depth["classes"] == [] and depth["depth_unit"] == "metre" and "steps" not in depth["training"]

    front, body = _front_matter(heads / "README.md")
    assert front["library_name"] == "mmdiff-gen" and front["license"] == "other" and "base_model" not in front
    assert {"mmdiff-gen", "seg", "depth"} <= set(front["tags"])
    assert tiny_bb.identity()["config_sha256"] in body and "its licence terms apply" in body
    assert "| `seg.safetensors` | seg | voc:/data/VOC2012 val | 1449 | miou 81.25 |" in body
    assert "| `seg.safetensors` | voc:/data/VOC2012 train_aug | 10582 | 20 | 6620 | 32 | 0.0001 |" in body
    assert "| `depth.safetensors` | not recorded | 50 | not recorded | not recorded |" in body  # older head file
    assert "abs_rel 0.0712, d1 0.951" in body and ", ".join(CLASSES) in body
    assert "mmdiff-gen generate --model tiny-random --heads ORG/NAME --tasks seg,depth" in body


def test_train_records_its_data_and_refreshes_the_card(tiny_bb, tmp_path):
    write_scenes(tmp_path / "scenes", 2, seed=0)
    data, cache = f"folder:{tmp_path / 'scenes'}", tmp_path / "cache"
    extract_dataset(tiny_bb, data, cache, ["seg"], batch_size=2)  # one cache to train and score on: fast
    out = tmp_path / "heads" / "seg.safetensors"
    res = run(app, ["train", "--cache", str(cache), "--eval-cache", str(cache), "--task", "seg", "--out", str(out),
                    "--epochs", "1", "--batch-size", "2", "--decoder-channels", "16"])
    assert res.exit_code == 0, res.output
    record = read_meta(out).metrics["train"]
    assert record["data"] == data and record["samples"] == 2 and record["steps"] == 1
    assert record["eval"]["data"] == data and record["eval"]["samples"] == 2
    seg = json.loads((out.parent / "config.json").read_text())["heads"]["seg.safetensors"]
    assert "miou" in seg["evaluation"]["metrics"]["seg"] and seg["training"]["steps"] == 1
    assert f"| `seg.safetensors` | seg | {data} | 2 | miou " in (out.parent / "README.md").read_text()


def test_licence_base_model_and_what_is_refused(heads, capsys):
    write_card(heads, license="apache-2.0")
    write_card(heads)  # a refresh (what `train` does) keeps the licence the folder records
    assert _front_matter(heads / "README.md")[0]["license"] == "apache-2.0"
    with pytest.raises(ValueError, match="Hub licence id"):
        write_card(heads, license="Apache 2.0\nevil: yes")
    # A backbone loaded from the HF cache records its repo id and snapshot commit: the card names it as base model.
    for f in ("seg", "depth"):
        _edit_backbone(heads / f"{f}.safetensors", name="black-forest-labs/FLUX.1-dev", weights="a" * 40)
    write_card(heads)
    assert _front_matter(heads / "README.md")[0]["base_model"] == "black-forest-labs/FLUX.1-dev"
    _edit_backbone(heads / "depth.safetensors", config_sha256="0123456789abcdef")
    with pytest.raises(ValueError, match="several backbones"):
        write_card(heads)
    # A README.md that is not an mmdiff-gen card (a project's, beside a head file) is never overwritten.
    (heads / "depth.safetensors").unlink()
    (heads / "README.md").write_text("# My project\n")
    with pytest.raises(ValueError, match="not an mmdiff-gen heads model card"):
        write_card(heads)
    _refresh_card(heads)  # what `train` does after writing a head there: the head stays, with a warning
    assert "no model card written" in capsys.readouterr().err
    assert (heads / "README.md").read_text() == "# My project\n"


def test_cli_heads_card(heads, tmp_path):
    res = run(app, ["heads", "card", str(heads), "--license", "mit"])
    assert res.exit_code == 0, res.output
    assert json.loads((heads / "config.json").read_text())["license"] == "mit"
    (tmp_path / "empty").mkdir()
    for args, text in ((["heads", "card", str(tmp_path / "nope")], "is not a heads folder"),
                       (["heads", "card", str(tmp_path / "empty")], "holds no head files"),
                       (["heads", "card", str(heads), "--license", "MIT"], "Hub licence id")):
        res = run(app, args)
        assert res.exit_code == 2 and text in res.output and len(res.output.strip().splitlines()) == 1, res.output


@pytest.mark.parametrize("model, files", [("toy", {"seg.safetensors", "saliency.safetensors", "depth.safetensors"}),
                                          ("toy-video", {"unified.safetensors"})])
def test_the_shipped_toy_heads_carry_their_card(model, files):
    """The committed card and config.json are what `heads card` writes today (regenerate them if this fails)."""
    folder = DEFAULT_HEADS[model]
    cfg = heads_config(folder)
    assert json.loads((folder / "config.json").read_text())["heads"] == cfg["heads"]
    assert set(cfg["heads"]) == files
    assert _front_matter(folder / "README.md")[0]["library_name"] == "mmdiff-gen"


# --- `--heads org/name` from the Hugging Face cache ---------------------------------------------------------------


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty HF cache, offline (huggingface_hub reads both variables when imported: its constants are set too)."""
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def publish(cache: Path, repo_id: str, folder: Path) -> Path:
    """`folder` as huggingface_hub caches a downloaded model repo: content-addressed blobs (LFS files by sha256,
    others by git blob sha1), a snapshot of relative symlinks for the commit, refs/main naming it."""
    repo = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    for f in sorted(folder.iterdir()):
        data = f.read_bytes()
        blob = (hashlib.sha256(data) if f.suffix == ".safetensors"
                else hashlib.sha1(b"blob %d\0" % len(data) + data)).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot / f.name).symlink_to(Path("../../blobs") / blob)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_heads_from_the_hub_cache_generate_on_the_toy_backbone(hub, tiny_bb, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(DEFAULT_HEADS["toy"] / "seg.safetensors", repo)
    write_card(repo)
    snapshot = publish(hub, "org/toy-heads", repo)
    (info,) = scan_cache_dir(hub).repos  # huggingface_hub reads the layout as its own
    (revision,) = info.revisions
    assert info.repo_id == "org/toy-heads" and revision.commit_hash == snapshot.name
    assert {f.file_name for f in revision.files} == {"seg.safetensors", "config.json", "README.md"}

    assert resolve_heads("org/toy-heads") == snapshot
    assert resolve_heads("org/toy-heads/seg.safetensors") == snapshot / "seg.safetensors"
    files, names = plan_annotator("toy", ["seg", "openseg"], Path("org/toy-heads"))
    assert files == {"seg": snapshot / "seg.safetensors"} and names == list(CLASSES)

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle on the left\n")
    res = run(app, ["generate", "--prompts", str(prompts), "--out", str(tmp_path / "ds"), "--model", "toy",
                    "--heads", "org/toy-heads", "--tasks", "seg", "--steps", "4", "--true-cfg", "1", "--size", "32",
                    "--device", "cpu", "--dtype", "float32"])
    assert res.exit_code == 0, res.output
    info = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    digest = hashlib.sha256((repo / "seg.safetensors").read_bytes()).hexdigest()
    assert info["heads"]["seg"]["sha256"] == digest and info["num_samples"] == 1
    # A local folder of the repo's name comes first.
    local = make_heads(tiny_bb, tmp_path / "org" / "toy-heads", tasks=("seg",))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        assert resolve_heads("org/toy-heads") == Path("org/toy-heads") and Path("org/toy-heads").resolve() == local


def test_hub_heads_of_another_backbone_are_refused(hub, tiny_bb, tmp_path):
    publish(hub, "org/tiny-heads", make_heads(tiny_bb, tmp_path / "h", tasks=("seg",)))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    res = run(app, ["generate", "--prompts", str(prompts), "--out", str(tmp_path / "ds"), "--model", "toy",
                    "--heads", "org/tiny-heads", "--tasks", "seg", "--steps", "4", "--device", "cpu"])
    assert res.exit_code == 2 and "was trained on 'tiny-random'" in res.output, res.output


def test_a_missing_repo_says_how_to_get_it(hub, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    res = run(app, ["generate", "--prompts", str(prompts), "--out", str(tmp_path / "ds"), "--model", "toy",
                    "--heads", "org/missing", "--tasks", "seg", "--device", "cpu"])
    assert res.exit_code == 2 and "hf download org/missing" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "ds").exists()
    res = run(app, ["eval", "--head", "org/missing", "--cache", str(tmp_path / "c")])
    assert res.exit_code == 2 and "hf download org/missing" in res.output, res.output


def test_eval_takes_one_head_of_a_folder(heads, tmp_path):
    res = run(app, ["eval", "--head", str(heads), "--cache", str(tmp_path / "c")])
    assert res.exit_code == 2 and "holds 2 head files (depth.safetensors, seg.safetensors)" in res.output, res.output


def test_downloads_ask_only_for_safetensors_and_the_card(hub, monkeypatch, tmp_path):
    """Online (HF_HUB_OFFLINE unset), a repo missing from the cache is fetched with the allow-list: no pickles."""
    import huggingface_hub

    calls = []

    def fake(repo_id, **kw):
        calls.append(kw)
        if kw.get("local_files_only"):
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        return str(tmp_path / "fetched")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert resolve_heads("org/new") == tmp_path / "fetched"
    assert calls == [{"local_files_only": True, "allow_patterns": REPO_FILES}, {"allow_patterns": REPO_FILES}]
    assert REPO_FILES == ["*.safetensors", "config.json", "README.md"]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # offline: the cache only
    assert hub_snapshot("org/new", REPO_FILES, download=True) is None and len(calls) == 3
