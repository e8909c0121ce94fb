"""The toy video backbone's recipe: a Wan-architecture pipeline (WanPipeline) trained on the toy video world."""

from __future__ import annotations

from dataclasses import dataclass

from ..backbones.loading import BUILTIN_FOLDERS
from ..backbones.tiny import CONCEPT_WORDS, build_tiny_wan
from .recipe import JsonFields
from .video_world import video_vocabulary

ASSET_DIR = BUILTIN_FOLDERS["toy-video"]  # the shipped pipeline folder


@dataclass(frozen=True)
class VideoToyRecipe(JsonFields):
    """Everything that defines the toy video backbone and how it is trained.

    Architecture: a WanTransformer3DModel of width 128 (4 heads × 32) with 8 blocks, an AutoencoderKLWan of 16
    latent channels compressing 4× in space and 4× in time (64×64 clips of 9 frames → 3 latent frames of 8×8 video
    tokens), and a tiny UMT5 encoder (width 64) that starts from the image toy's pretrained T5 (which binds class and
    colour to each object, `toy-world.md`) and learns the motion words jointly with the transformer at a lower rate.
    The VAE trains on short windows, then on whole clips; the transformer with the image toy's auxiliary class-map
    loss on every latent frame. Measured on this 2-core CPU: a VAE step (16 windows of 5 frames, or 8 clips of 9)
    1.7–2 s, a transformer step (16 clips) 0.58 s.
    """

    # data
    train_clips: int = 6_000
    frames: int = 9
    data_seed: int = 0  # clips data_seed … data_seed + train_clips − 1; evaluation uses other seeds
    # architecture
    dim_head: int = 32
    heads: int = 4
    blocks: int = 8
    text_width: int = 64
    text_layers: int = 2
    latent_channels: int = 16
    vae_dims: tuple[int, ...] = (16, 32, 32)
    max_sequence_length: int = 32
    flow_shift: float = 2.0
    # VAE
    vae_steps: int = 1_400
    vae_batch: int = 16
    # The first `vae_window_steps` steps train on windows of `vae_frames` frames (the first frame alone, then one
    # chunk of 4: frames 0–4 or 4–8) at `vae_batch`; the rest on whole clips at half the batch. Windows alone leave
    # later chunks, which the causal encoder and decoder read with a previous chunk in their caches, unlearned.
    vae_frames: int = 5
    vae_window_steps: int = 1_100
    vae_lr: float = 1e-3
    vae_edge_weight: float = 4.0
    vae_kl: float = 1e-4
    # transformer + text encoder (rectified flow: the transformer predicts ε − x0 at σ·1000, as UniPC reads it)
    dit_steps: int = 4_000
    dit_batch: int = 16
    dit_lr: float = 6e-4
    dit_seg_weight: float = 0.5  # auxiliary: a middle block predicts each latent frame's class map (dropped at export)
    text_init: bool = True  # start the text encoder from the image toy's pretrained T5
    text_lr_scale: float = 0.3
    dit_warmup: int = 300
    caption_dropout: float = 0.1
    t_logit_mean: float = 0.3
    ema: float = 0.999
    # sampling settings recorded beside the shipped pipeline
    sample_steps: int = 24
    guidance_scale: float = 5.0
    seed: int = 0

    def build_pipeline(self):
        """An untrained WanPipeline of this architecture (random weights, a word-level tokenizer)."""
        return build_tiny_wan(words=video_vocabulary() + CONCEPT_WORDS, dim_head=self.dim_head, heads=self.heads,
                              blocks=self.blocks, text_width=self.text_width, text_layers=self.text_layers,
                              latent_channels=self.latent_channels, vae_dims=self.vae_dims, ffn_mult=4,
                              flow_shift=self.flow_shift, text_ffn="relu", seed=self.seed)
