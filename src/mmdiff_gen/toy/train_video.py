"""The toy video backbone's recipe as resumable phases: data → vae → dit (transformer + text encoder) → export.

Each phase resumes from its checkpoint in the work folder (`_loop.Phase`), as the image toy's do.

- data: `train_clips` clips of the toy video world (`video_world.render_clip`), rendered once into work/clips.npz.
- vae: the AutoencoderKLWan, first on windows of `vae_frames` frames (its causal encoder reads frame 0 alone and then
  chunks of 4: 1 + 4 frames at about half a clip's cost), then on whole clips (a window never shows the encoder and
  decoder a chunk read with a previous chunk in their causal caches: trained on windows alone, frames 5–8 of a
  9-frame clip came back at 12–19 dB against 25–27 dB for frames 0–4), L1 + L2 reconstruction weighted up on
  label boundaries (as the image toy's keeps star points and ring holes), a small KL; then its per-channel latent
  mean and std are recorded in its config
  (`latents_mean`, `latents_std`: what WanPipeline un-normalises with before decoding).
- dit: rectified flow on the normalised latents (B, z, f, h, w): x_σ = (1 − σ)·x0 + σ·ε, the transformer predicts
  ε − x0 at timestep σ·1000 (what UniPC's flow prediction reads), σ logit-normal, plus the image toy's auxiliary
  class-map loss per latent frame; the text encoder starts from the image toy's pretrained T5
  (`init_text_from_image_toy`) and learns jointly at a lower rate; the text is encoded as WanPipeline encodes it
  (padded to `max_sequence_length`, embeddings past the
  prompt zeroed), with caption dropout for classifier-free guidance; EMA weights are what is exported.
- export: the EMA pipeline as a diffusers folder (safetensors) with mmdiff.json (sampling, classes, palette).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .._atomic import atomic_path
from ..backbones.loading import BUILTIN_FOLDERS
from ..io.state import load_state, save_state
from ..train.trainer import ema_update
from ._loop import Checkpoint, Phase, conv_autocast
from .data import boundary_weight, class_fractions
from .export import load_ema, save_pipeline
from .train_dit import class_map_loss
from .train_vae import vae_loss
from .video_recipe import ASSET_DIR, VideoToyRecipe
from .video_world import render_clip
from .world import CLASSES

PHASES = ("vae", "dit", "export")
DEFAULT_WORK = Path.home() / ".cache" / "mmdiff-gen" / "toy-video"


@dataclass
class ClipArrays:
    """N clips: frames (N, F, 64, 64, 3) uint8, seg (N, F, 64, 64) uint8, depth (N, F, 64, 64) float16, captions."""

    frames: np.ndarray
    seg: np.ndarray
    depth: np.ndarray
    captions: list[str]

    def __len__(self) -> int:
        return len(self.captions)


def load_or_render_clips(cache: Path, start: int, n: int, frames: int) -> ClipArrays:
    """Clips start … start + n − 1 of `frames` frames, from `cache` (.npz) when it holds exactly those."""
    cache = Path(cache)
    if cache.is_file():
        z = np.load(cache, allow_pickle=False)
        if (int(z["start"]), len(z["captions"]), z["frames"].shape[1]) == (start, n, frames):
            return ClipArrays(z["frames"], z["seg"], z["depth"], [str(c) for c in z["captions"]])
    clips = [render_clip(s, frames=frames) for s in range(start, start + n)]
    arrays = ClipArrays(np.stack([c.frames for c in clips]), np.stack([c.seg for c in clips]),
                        np.stack([c.depth for c in clips]).astype(np.float16), [c.caption for c in clips])
    cache.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache) as tmp, open(tmp, "wb") as f:
        np.savez(f, frames=arrays.frames, seg=arrays.seg, depth=arrays.depth, captions=np.array(arrays.captions),
                 start=np.array(start))
    return arrays


def to_video(frames: np.ndarray) -> torch.Tensor:
    """(N, F, H, W, 3) uint8 → (N, 3, F, H, W) float in [−1, 1], as the VAE takes clips."""
    return torch.from_numpy(frames).permute(0, 4, 1, 2, 3).float() / 127.5 - 1


def train_video_toy(work: Path = DEFAULT_WORK, recipe: VideoToyRecipe = VideoToyRecipe(),
                    phases: Sequence[str] = PHASES, steps: int | None = None, out: Path | None = None) -> dict:
    """Run the chosen phases in order, each resuming from its checkpoint in `work`; `steps` overrides every phase's
    step count (smoke runs), `out` where export writes (default: the packaged toy-video folder). Returns wall seconds
    per phase (also appended to work/timings.jsonl)."""
    bad = [p for p in phases if p not in PHASES]
    if bad:
        raise KeyError(f"unknown phase {bad[0]!r}; phases: {', '.join(PHASES)}")
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    saved, current = work / "recipe.json", json.loads(json.dumps(recipe.to_dict()))
    if saved.is_file():
        differ = sorted(k for k, v in current.items() if v != json.loads(saved.read_text()).get(k))
        if differ:
            raise ValueError(f"{work} holds a run of another recipe (it differs in {', '.join(differ)}); "
                             "start in another --work folder")
    saved.write_text(json.dumps(current, indent=1))
    torch.manual_seed(recipe.seed)
    timings = {}
    t = time.time()
    data = load_or_render_clips(work / "clips.npz", recipe.data_seed, recipe.train_clips, recipe.frames)
    timings["data"] = time.time() - t
    pipe = recipe.build_pipeline()
    vae_ready = False  # the trained VAE and its latent statistics, in `pipe` once per run
    for phase in [p for p in PHASES if p in phases]:
        t = time.time()
        if phase == "vae":
            train_vae(pipe.vae, data, recipe, work, steps)
        elif not vae_ready:
            _load_vae(pipe.vae, work, data)
        vae_ready = True
        if phase == "dit":
            train_dit(pipe, data, recipe, work, steps)
        elif phase == "export":
            export(pipe, recipe, work, out)
        timings[phase] = time.time() - t
    with open(work / "timings.jsonl", "a") as f:
        f.write(json.dumps(timings) + "\n")
    return timings


def train_vae(vae, data: ClipArrays, recipe: VideoToyRecipe, work: Path, steps: int | None = None) -> None:
    steps = recipe.vae_steps if steps is None else steps
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    phase = Phase(work, "vae", {"model": vae, "opt": opt}, steps, lr=recipe.vae_lr, warmup=100)
    gen = torch.Generator().manual_seed(recipe.seed + 1 + phase.start)
    vae.train().requires_grad_(True)
    for step in phase:
        n, b = (recipe.vae_frames, recipe.vae_batch) if step < recipe.vae_window_steps else (recipe.frames,
                                                                                              recipe.vae_batch // 2)
        starts = np.arange(0, recipe.frames - n + 1, n - 1)  # windows that start where a clip's chunks start
        idx = torch.randint(0, len(data), (b,), generator=gen).numpy()
        t0 = starts[torch.randint(0, len(starts), (b,), generator=gen).numpy()]
        window = idx[:, None], t0[:, None] + np.arange(n)  # (B, n) clip and frame indices
        x = to_video(data.frames[window])  # (B, 3, n, H, W)
        seg = data.seg[window]  # (B, n, H, W)
        weight = torch.from_numpy(boundary_weight(seg.reshape(-1, *seg.shape[2:]), recipe.vae_edge_weight))
        weight = weight.view(*seg.shape).unsqueeze(1)  # (B, 1, F, H, W)
        phase.step(vae_loss(vae, x, weight, recipe.vae_kl, gen))
    vae.eval().requires_grad_(False)
    set_latent_stats(vae, data)


@torch.no_grad()
def encode_clips(vae, frames: np.ndarray, batch: int = 32) -> torch.Tensor:
    """(N, z, f, h, w) float32 posterior means of uint8 clips, before normalisation."""
    out = []
    for i in range(0, len(frames), batch):
        with conv_autocast():
            out.append(vae.encode(to_video(frames[i : i + batch])).latent_dist.mean.float())
    return torch.cat(out)


@torch.no_grad()
def set_latent_stats(vae, data: ClipArrays, n: int = 512) -> None:
    """Record the per-channel latent mean and std in the VAE's config (WanPipeline's `latents_mean` / `latents_std`)."""
    lat = encode_clips(vae, data.frames[:n]).transpose(0, 1).flatten(1)  # (z, N·f·h·w)
    vae.register_to_config(latents_mean=lat.mean(1).tolist(), latents_std=lat.std(1).tolist())


def _load_vae(vae, work: Path, data: ClipArrays) -> None:
    Checkpoint(work, "vae").restore(vae)
    set_latent_stats(vae, data)


@torch.no_grad()
def cached_latents(vae, data: ClipArrays, work: Path) -> torch.Tensor:
    """(N, z, f, h, w) float16 normalised posterior means of every clip, cached in work/latents.safetensors."""
    path = Path(work) / "latents.safetensors"
    key = {"n": len(data), "mean": vae.config.latents_mean, "std": vae.config.latents_std}
    if path.is_file():
        try:
            saved = load_state(path)
        except ValueError:
            saved = None  # a damaged or foreign file is only a cache miss
        if isinstance(saved, dict) and saved.get("key") == key and isinstance(saved.get("latents"), torch.Tensor):
            return saved["latents"]
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    lat = ((encode_clips(vae, data.frames) - mean) / std).half()
    save_state(path, {"key": key, "latents": lat})
    return lat


@torch.no_grad()
def init_text_from_image_toy(pipe) -> int:
    """Start the toy video's UMT5 encoder from the shipped image toy's pretrained T5 (same widths, T5's ReLU
    feed-forward): every weight, the embedding rows of the words both vocabularies hold (the motion words keep their
    random rows), and T5's one relative-position bias — layer 0's, which every T5 layer reuses — as each UMT5 layer's
    own, so that both encoders compute the same features for a caption without motion words. Returns how many
    vocabulary rows were copied."""
    from safetensors.torch import load_file
    from transformers import PreTrainedTokenizerFast

    src = BUILTIN_FOLDERS["toy"]
    state = load_file(src / "text_encoder_2" / "model.safetensors")
    old = PreTrainedTokenizerFast.from_pretrained(src / "tokenizer_2").get_vocab()
    enc = pipe.text_encoder
    bias = "layer.0.SelfAttention.relative_attention_bias.weight"
    for i in range(enc.config.num_layers):
        state[f"encoder.block.{i}.{bias}"] = state[f"encoder.block.0.{bias}"]
    rows = enc.shared.weight.clone()  # (V_video, D)
    pairs = [(new_id, old[w]) for w, new_id in pipe.tokenizer.get_vocab().items() if w in old]
    rows[[n for n, _ in pairs]] = state["shared.weight"][[o for _, o in pairs]]
    state["shared.weight"] = rows
    missing, unexpected = enc.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"encoder.embed_tokens.weight"}:  # embed_tokens is tied to shared
        raise ValueError(f"the image toy's T5 does not fit the video encoder: {missing + unexpected}")
    return len(pairs)


def encode_text(pipe, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, D) T5 embeddings with the positions past each prompt zeroed, as WanPipeline's `_get_t5_prompt_embeds`."""
    return pipe.text_encoder(ids, mask).last_hidden_state * mask[..., None]


def class_map_tokens(seg: torch.Tensor, latent_frames: int, h: int, w: int, temporal: int) -> torch.Tensor:
    """(B, F, H, W) class ids of a clip → (B, f·h/2·w/2, classes, 4): for each latent frame (it encodes frame 0
    alone, then `temporal` frames each) the class fractions of each video token's 2×2 latent cells, averaged over
    the frames it encodes; tokens in the transformer's order (frames, rows, columns)."""
    b, f, n = seg.shape[0], latent_frames, len(CLASSES)
    frac = class_fractions(seg.flatten(0, 1), h, w).view(b, seg.shape[1], n, h, w)
    groups = [frac[:, :1]] + [frac[:, temporal * j - temporal + 1 : temporal * j + 1] for j in range(1, f)]
    per_latent = torch.stack([g.mean(1) for g in groups], 1)  # (B, f, classes, h, w)
    cells = per_latent.view(b, f, n, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4, 6)
    return cells.reshape(b, f * (h // 2) * (w // 2), n, 4)


def train_dit(pipe, data: ClipArrays, recipe: VideoToyRecipe, work: Path, steps: int | None = None) -> None:
    """Train the transformer and the text encoder in place; leaves the EMA weights in the pipeline.

    As the image toy's transformer does, a linear probe on the middle block's video tokens predicts the clean
    clip's class map (`class_map_tokens`) from the noisy latent: an auxiliary target that shapes the features
    without moving the flow objective's minimiser; the probe is dropped at export (the shipped model is plain Wan).
    """
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    steps = recipe.dit_steps if steps is None else steps
    lat = cached_latents(pipe.vae, data, work)
    f, h, w = lat.shape[2:]
    temporal = pipe.vae.config.scale_factor_temporal
    tok = pipe.tokenizer([prompt_clean(c) for c in data.captions + [""]], padding="max_length", truncation=True,
                         max_length=recipe.max_sequence_length, return_tensors="pt")
    empty = len(data)  # the empty caption (caption dropout)
    tr, text = pipe.transformer, pipe.text_encoder
    models = torch.nn.ModuleDict({"transformer": tr, "t5": text})
    probe = torch.nn.Linear(tr.config.num_attention_heads * tr.config.attention_head_dim, len(CLASSES) * 4)
    seen: dict[str, torch.Tensor] = {}
    hook = tr.blocks[len(tr.blocks) // 2 - 1].register_forward_hook(lambda m, i, o: seen.__setitem__("tokens", o))
    ema = copy.deepcopy(models).eval().requires_grad_(False)
    opt = torch.optim.AdamW([{"params": list(tr.parameters()) + list(probe.parameters())},
                             {"params": text.parameters(), "lr_scale": recipe.text_lr_scale}], lr=recipe.dit_lr,
                            weight_decay=0.0)
    phase = Phase(work, "dit", {"models": models, "ema": ema, "probe": probe, "opt": opt}, steps, lr=recipe.dit_lr,
                  warmup=recipe.dit_warmup)
    if phase.start == 0 and recipe.text_init:
        init_text_from_image_toy(pipe)
        ema.load_state_dict(models.state_dict())
    gen = torch.Generator().manual_seed(recipe.seed + 2 + phase.start)
    models.train().requires_grad_(True)
    for step in phase:
        for g in opt.param_groups:  # the text encoder at its fraction of the scheduled rate
            g["lr"] *= g.get("lr_scale", 1.0)
        b = recipe.dit_batch
        idx = torch.randint(0, len(data), (b,), generator=gen)
        x0 = lat[idx].float()  # (B, z, f, h, w)
        cap = torch.where(torch.rand(b, generator=gen) < recipe.caption_dropout, empty, idx)
        sigma = torch.sigmoid(torch.randn(b, generator=gen) + recipe.t_logit_mean)
        noise = torch.randn(x0.shape, generator=gen)
        s = sigma.view(-1, 1, 1, 1, 1)
        pred = tr(hidden_states=(1 - s) * x0 + s * noise, timestep=sigma * 1000,
                  encoder_hidden_states=encode_text(pipe, tok.input_ids[cap], tok.attention_mask[cap]),
                  return_dict=False)[0]
        flow = F.mse_loss(pred, noise - x0)
        target = class_map_tokens(torch.from_numpy(data.seg[idx.numpy()]), f, h, w, temporal)  # (B, tokens, classes, 4)
        seg = class_map_loss(probe, seen.pop("tokens"), target)
        phase.step(flow + recipe.dit_seg_weight * seg, clip=models.parameters(), shown=flow)
        ema_update(ema, models, recipe.ema if step > recipe.dit_warmup else 0.0)
    hook.remove()
    models.load_state_dict(ema.state_dict())
    models.eval().requires_grad_(False)


def export(pipe, recipe: VideoToyRecipe, work: Path, out: Path | None = None) -> Path:
    """The EMA transformer and text encoder of work/dit.state.safetensors, with the trained VAE, as a diffusers folder
    (safetensors) and its mmdiff.json; written beside `out` and renamed into place."""
    step = load_ema(torch.nn.ModuleDict({"transformer": pipe.transformer, "t5": pipe.text_encoder}), work)
    settings = {
        "name": "toy-video",
        "sampling": {"height": 64, "width": 64, "num_frames": recipe.frames, "num_inference_steps": recipe.sample_steps,
                     "guidance_scale": recipe.guidance_scale, "max_sequence_length": recipe.max_sequence_length},
        "trained_steps": {"dit": step},
        "recipe": recipe.to_dict(),
    }
    return save_pipeline(pipe, Path(out) if out is not None else ASSET_DIR, settings, (pipe.tokenizer,))
