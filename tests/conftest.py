"""Shared fixtures: one tiny FLUX-architecture pipeline built from configs per test session."""

import pytest
import torch

from _families import Recorder
from mmdiff_gen.backbones import wrap_pipeline
from mmdiff_gen.backbones.tiny import build_tiny_flux

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_pipe():
    return build_tiny_flux(seed=0)


@pytest.fixture(scope="session")
def tiny(tiny_pipe):
    return wrap_pipeline(tiny_pipe, name="tiny")


@pytest.fixture
def recorder():
    made = []

    def make(transformer, blocks, image_tokens=None):
        r = Recorder(transformer, blocks, image_tokens)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()
