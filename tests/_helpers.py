"""Helpers shared by test modules (not tests themselves)."""

import torch

from mmdiff_gen.capture import PAPER_SIGMAS
from mmdiff_gen.heads.checkpoint import HeadMeta, save_head
from mmdiff_gen.heads.model import HeadConfig, MMDiffHead
from mmdiff_gen.tasks import get as get_task
from mmdiff_gen.toy.world import CLASSES, PALETTE


def make_heads(backbone, folder, tasks=("seg", "saliency", "depth"), blocks="feature", metrics=None):
    """Untrained but complete head files for `backbone` (the job's plumbing does not need trained weights);
    `metrics`: {task: what its file records as metrics}, as training would."""
    layers = list(backbone.default_layers(blocks=blocks))
    for task in tasks:
        cfg = HeadConfig(tasks=task, feature_dim=backbone.feature_dim, num_layers=len(layers), num_timesteps=4,
                         num_concepts=len(get_task(task).concepts), num_classes=len(CLASSES) if task == "seg" else 1,
                         dim=16, decoder_channels=16)
        torch.manual_seed(0)
        meta = HeadMeta(config=cfg, backbone=backbone.identity(), layers=layers, sigmas=list(PAPER_SIGMAS),
                        concepts=list(get_task(task).concepts), classes=list(CLASSES) if task == "seg" else [],
                        palette=[list(c) for c in PALETTE], depth_unit="metre" if task == "depth" else "",
                        blocks=blocks, metrics=(metrics or {}).get(task, {}))
        save_head(folder / f"{task}.safetensors", MMDiffHead(cfg), meta)
    return folder
