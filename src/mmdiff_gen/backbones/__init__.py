"""Frozen diffusers backbones: loading, geometry and the sampling schedule."""

from .base import Backbone
from .flux import FluxBackbone
from .flux2 import Flux2Backbone
from .qwenimage import QwenImageBackbone
from .loading import BackboneNotFound, load_backbone, wrap_pipeline
from .schedule import ContractSchedule, contract_schedule
from .sd3 import SD3Backbone
from .wan import WanBackbone

__all__ = [
    "Backbone",
    "BackboneNotFound",
    "ContractSchedule",
    "Flux2Backbone",
    "FluxBackbone",
    "QwenImageBackbone",
    "SD3Backbone",
    "WanBackbone",
    "contract_schedule",
    "load_backbone",
    "wrap_pipeline",
]
