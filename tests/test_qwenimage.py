"""What only Qwen-Image has, beyond the family contract (test_families.py): its prompt length as the pipeline cuts
it, and guidance that never reaches its transformer."""

import pytest

from mmdiff_gen.backbones import wrap_pipeline
from mmdiff_gen.backbones.tiny import build_tiny_qwenimage


@pytest.fixture(scope="module")
def qwen():
    return wrap_pipeline(build_tiny_qwenimage(seed=0), name="tiny-qwenimage")


def test_overlong_prompts_count_the_template_tokens_the_pipeline_keeps(qwen):
    # "a red circle" + the template's closing <|im_end|> \n <|im_start|> assistant \n: 3 + 5 text tokens.
    assert qwen.overlong_prompts(["a red circle", "a cat"], 7) == [(0, 8)]
    assert qwen.overlong_prompts(["a red circle"], 8) == []
    assert qwen.text_token_mask(["a red circle"], 1024).shape == (1, 8)


def test_guidance_never_reaches_the_transformer(qwen):
    kw = qwen.pipeline_kwargs(qwen.sampling_kwargs(guidance_scale=5.0))
    assert kw["guidance_scale"] is None and kw["true_cfg_scale"] == 4.0 and kw["negative_prompt"] == ""
    assert qwen.guidance(2, 5.0) is None
