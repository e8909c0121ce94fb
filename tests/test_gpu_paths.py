"""What only a GPU would show, observed on the CPU where the mechanism allows: how a failure is classified, the
transformer put back after a failed batch under model offload, compile modes that replay CUDA graphs refused."""

import pytest
import torch

from mmdiff_gen.jobs import dataset_job
from mmdiff_gen.jobs.annotate import Annotator, head_files
from mmdiff_gen.jobs.dataset_job import GenerateJob, device_failure, run_generate

from _helpers import make_heads


@pytest.mark.parametrize("error, kind", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "oom"),
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), "oom"),
    (RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), "oom"),
    (RuntimeError("CUDA error: out of memory"), "oom"),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), "broken"),
    (RuntimeError("CUDA error: device-side assert triggered"), "broken"),
    (RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx`"), "broken"),
    (RuntimeError("CUDA error: CUBLAS_STATUS_NOT_INITIALIZED"), "broken"),
    (ValueError("prompt too long"), None),
])
def test_a_failure_is_out_of_memory_a_broken_device_or_neither(error, kind):
    """An allocation failure (however cuBLAS words it) is retried sample by sample; a broken context stops the job."""
    assert device_failure(error) == kind


def test_a_failed_batch_puts_offloaded_models_back_before_the_retry(tiny, tmp_path, monkeypatch):
    """Under model offload diffusers frees the transformer only at the end of a successful call: after an OOM the
    job calls the pipeline's maybe_free_model_hooks before it retries, so T5 never encodes beside the transformer."""
    annotator = Annotator(head_files(make_heads(tiny, tmp_path / "heads"), ["seg"]), tiny.identity())
    events = []
    real = dataset_job.generate

    def generate(backbone, prompts, *a, **kw):
        events.append(("generate", len(prompts)))
        if len(prompts) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(backbone, prompts, *a, **kw)

    monkeypatch.setattr(dataset_job, "generate", generate)
    monkeypatch.setattr(tiny.pipe, "maybe_free_model_hooks", lambda: events.append(("free",)), raising=False)
    job = GenerateJob(out=tmp_path / "ds", tasks=("seg",), batch_size=2, height=64, width=64, num_inference_steps=2)
    rep = run_generate(tiny, annotator, ["a red circle", "a blue star"], job, progress=False)
    assert rep.samples_written == 2 and rep.samples_failed == 0
    # (a successful pipeline call frees its models too: the one that matters comes between the OOM and the retry)
    assert events[:3] == [("generate", 2), ("free",), ("generate", 1)], events


def test_compile_modes_that_replay_cuda_graphs_are_refused(tiny):
    from mmdiff_gen.capture import compile_backbone

    for kwargs in ({"torch_mode": "reduce-overhead"}, {"torch_mode": "max-autotune"},
                   {"options": {"triton.cudagraphs": True}}):
        with pytest.raises(ValueError, match="replays CUDA graphs"):
            compile_backbone(tiny, "blocks", **kwargs)


def test_group_offload_keeps_the_vae_on_the_device():
    """Pipelines call the VAE's decode, never its forward: under group offload with streams its order-recording hook
    would never complete and its record would grow at every decode. It stays on the device instead."""
    from mmdiff_gen.backbones.runtime import apply_runtime
    from mmdiff_gen.backbones.tiny import build_tiny_flux

    pipe = build_tiny_flux(seed=0)
    apply_runtime(pipe, offload="group", storage="full", dtype=torch.float32, device="cpu")

    def grouped(module):
        return any(getattr(m, "_diffusers_hook", None) is not None and
                   m._diffusers_hook.get_hook("group_offloading") is not None for m in module.modules())

    assert grouped(pipe.transformer) and grouped(pipe.text_encoder) and not grouped(pipe.vae)
