"""`mmdiff-gen toy grounding` on a seconds-long budget: the LoRA, then every before / after figure, and resume."""

from mmdiff_gen.toy.grounding import run_grounding
from mmdiff_gen.train.grounding import GroundingConfig


def test_before_and_after_are_measured_alike_and_the_lora_is_kept(tmp_path):
    kw = dict(train_scenes=3, val_scenes=2, probe_n=2, consistency_n=2, fidelity_n=2, head_epochs=1,
              cfg=GroundingConfig(steps=2, batch_size=2, lr=1e-3, warmup=1))
    report = run_grounding(tmp_path, **kw)
    assert set(report) == {"lora", "base", "fine-tuned"} and report["lora"]["config"]["steps"] == 2
    for name in ("base", "fine-tuned"):
        r = report[name]
        assert 0 <= r["openseg on renders (expert block)"]["miou"] <= 100
        assert 0 <= r["seg head vs oracle on generated"] <= 100 and set(r["fidelity"]) == {"1_object", "2_object"}
    # The fine-tuned backbone's seg head read its own features (a cache of their own).
    assert (tmp_path / "train_cache_lora" / "cache.json").is_file()
    lora = tmp_path / "grounding_lora" / "pytorch_lora_weights.safetensors"
    stamp = lora.stat().st_mtime_ns
    again = run_grounding(tmp_path, **kw)
    assert lora.stat().st_mtime_ns == stamp and again["fine-tuned"]["seg head on renders"] == \
        report["fine-tuned"]["seg head on renders"]
