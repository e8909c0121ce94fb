"""Shared fixtures: one tiny FLUX-architecture pipeline built from configs per test session."""

import pytest
import torch

from mmdiff_gen.backbones import wrap_pipeline
from mmdiff_gen.backbones.tiny import build_tiny_flux

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_pipe():
    return build_tiny_flux(seed=0)


@pytest.fixture(scope="session")
def tiny(tiny_pipe):
    return wrap_pipeline(tiny_pipe, name="tiny")


class CallRecorder:
    """Reference hooks, independent of mmdiff_gen: every transformer call's sigma and every block output."""

    def __init__(self, transformer, blocks):
        self.sigmas, self.outputs = [], []
        self.handles = [transformer.register_forward_pre_hook(self._pre, with_kwargs=True)]
        self.handles += [b.register_forward_hook(self._out(i)) for i, b in enumerate(blocks)]

    def _pre(self, _m, _a, kwargs):
        self.sigmas.append(kwargs["timestep"].detach().clone())
        self.outputs.append({})

    def _out(self, i):
        def hook(_m, _i, out):
            self.outputs[-1][i] = out[1].detach().clone()
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


@pytest.fixture
def recorder():
    made = []

    def make(transformer, blocks):
        r = CallRecorder(transformer, blocks)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()
