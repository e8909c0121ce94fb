"""Capture inside the generation pass: features over layers × sigmas, concept maps, real-image mode."""

from ._hooks import compile_backbone, compiled_graphs, prepare
from .generate import Generation, generate, plan_schedule
from .real import extract
from .session import Capture, CaptureResult
from .spec import PAPER_SIGMAS, CaptureSpec

__all__ = [
    "PAPER_SIGMAS",
    "Capture",
    "CaptureResult",
    "CaptureSpec",
    "Generation",
    "compile_backbone",
    "compiled_graphs",
    "extract",
    "generate",
    "plan_schedule",
    "prepare",
]
