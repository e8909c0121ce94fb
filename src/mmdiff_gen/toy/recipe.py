"""The toy backbone's recipe: architecture and training settings in one frozen config."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from ..backbones.loading import BUILTIN_FOLDERS
from ..backbones.tiny import CONCEPT_WORDS, build_tiny_flux
from .world import vocabulary

ASSET_DIR = BUILTIN_FOLDERS["toy"]  # the shipped pipeline folder


class JsonFields:
    """A frozen dataclass recipe as JSON: its fields, and the default recipe with some of them replaced (a work
    folder's recipe.json; lists back to tuples)."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict):
        """The default recipe with `values` (some or all of to_dict()'s fields, e.g. a work folder's recipe.json)."""
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise KeyError(f"unknown recipe field(s): {', '.join(sorted(unknown))}")
        return replace(cls(), **{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


@dataclass(frozen=True)
class ToyRecipe(JsonFields):
    """Everything that defines the toy backbone and how it is trained.

    Architecture: a FLUX transformer of width 128 (4 heads × 32) with 2 double-stream and 8
    single-stream blocks (capture layers 1, 3, 5, 7 spread across depth), a 16-channel VAE with 4×
    downsampling (64×64 images → 8×8 image tokens of 8 px), tiny CLIP and T5 encoders (width 64)
    pretrained to predict each scene's layout, and the object at each place, from its caption (so that
    word order binds class and colour to each object) and then frozen.
    """

    # data
    train_scenes: int = 30_000
    data_seed: int = 0  # scenes data_seed … data_seed + train_scenes − 1; evaluation uses other seeds
    # architecture
    dim_head: int = 32
    heads: int = 4
    double_blocks: int = 2
    single_blocks: int = 8
    text_width: int = 64
    text_layers: int = 2
    vae_channels: tuple[int, ...] = (32, 64, 64)
    t5_max_length: int = 32
    # VAE
    vae_steps: int = 800
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_edge_weight: float = 4.0  # extra loss weight on label boundaries keeps star points and ring holes
    vae_kl: float = 1e-4
    # text encoders, pretrained to predict the scene layout from the caption, then frozen
    text_steps: int = 2000
    text_batch: int = 128
    text_lr: float = 1e-3
    # transformer (rectified flow)
    dit_steps: int = 6000
    dit_batch: int = 32
    dit_lr: float = 6e-4
    dit_warmup: int = 300
    dit_seg_weight: float = 0.5  # auxiliary: a mid single-stream block predicts the clean image's class map
    caption_dropout: float = 0.1
    t_logit_mean: float = 0.3  # weights training towards noisier t, where layout and shape are decided
    ema: float = 0.999
    # oracle
    oracle_steps: int = 600
    oracle_batch: int = 64
    oracle_lr: float = 2e-3
    # sampling settings recorded beside the shipped pipeline
    sample_steps: int = 24
    true_cfg_scale: float = 5.0
    seed: int = 0

    def build_pipeline(self):
        """An untrained FluxPipeline of this architecture (random weights, word-level tokenizers)."""
        return build_tiny_flux(
            words=vocabulary() + CONCEPT_WORDS,
            dim_head=self.dim_head,
            heads=self.heads,
            double_blocks=self.double_blocks,
            single_blocks=self.single_blocks,
            text_width=self.text_width,
            text_layers=self.text_layers,
            vae_channels=self.vae_channels,
            guidance_embeds=False,  # true CFG with caption dropout, no distilled guidance
            t5_max_length=self.t5_max_length,
            seed=self.seed,
        )
