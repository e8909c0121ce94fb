"""What capture needs to know about a backbone, whatever its family (FLUX, SD3 / SD3.5)."""

from __future__ import annotations

import hashlib
import json
import re
from abc import ABC, abstractmethod
from typing import Any, Sequence

import torch
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn


def _class_pattern(name: str) -> re.Pattern:
    """A class name as a whole word in running text: any case, optional separators, plural ending."""
    letters = [re.escape(ch) for ch in name.lower() if not ch.isspace() and ch not in "_-"]
    return re.compile(r"(?<![^\W\d_])" + r"[\s_-]?".join(letters) + r"(?:e?s)?(?![^\W\d_])", re.IGNORECASE)


def meta(*shape: int) -> torch.Tensor:
    """An empty tensor on the meta device: the shape of a transformer argument, for `Backbone.meta_inputs`."""
    return torch.empty(*shape, device="meta")


class Backbone(ABC):
    """A frozen diffusers pipeline plus the facts capture needs about its transformer.

    Subclasses describe one architecture family: which blocks carry image features, how the
    transformer receives the timestep, how image tokens map to pixels. Nothing here runs hooks.
    """

    #: Short family name recorded in checkpoints and dataset manifests.
    family: str = ""

    def __init__(self, pipe: Any, name: str, settings: dict | None = None, weights_id: str = ""):
        """Args:
            pipe: the diffusers pipeline.
            name: how the user named it (hub id, folder, short name); recorded in outputs.
            settings: the folder's mmdiff.json, if any: recommended `sampling` kwargs and
                `capture_layers`.
            weights_id: a fingerprint of the weights (empty for pipelines built in memory).
        """
        self.pipe = pipe
        self.name = name
        self.weights_id = weights_id
        self.settings = dict(settings or {})
        self._concept_tokens: dict = {}  # (words, device, dtype) → initial concept tokens
        pipe.transformer.eval().requires_grad_(False)

    # --- the transformer --------------------------------------------------------------------
    @property
    def transformer(self) -> nn.Module:
        return self.pipe.transformer

    @property
    def device(self) -> torch.device:
        """Where the transformer computes: the pipeline's execution device. Under model, sequential or
        group offload the weights sit elsewhere (cpu, meta) between calls; inputs must go here."""
        dev = getattr(self.pipe, "_execution_device", None)  # DiffusionPipeline: offload-aware
        if dev is None:
            dev = getattr(self.transformer, "device", None)  # ModelMixin: group-offload-aware
        return torch.device(dev) if dev is not None else next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the transformer computes in, never a storage dtype: diffusers' own answer (layerwise
        casting's compute dtype; else the first floating parameter, which skips quantized uint8 / int8
        storage). fp8 without a compute dtype cannot run and is refused."""
        dt = getattr(self.transformer, "dtype", None)
        if not isinstance(dt, torch.dtype):
            dt = next(self.transformer.parameters()).dtype
        if not dt.is_floating_point or dt.itemsize < 2:
            raise ValueError(f"the transformer's weights are {str(dt).removeprefix('torch.')} with no compute dtype: "
                             "enable_layerwise_casting(storage_dtype=..., compute_dtype=torch.bfloat16) or load it "
                             "in bfloat16")
        return dt

    def check_capture(self) -> None:
        """Refuse, in one line naming it, a runtime setting under which captured features would be wrong."""
        tr = self.transformer
        cache = getattr(tr, "_cache_config", None)
        if cache is not None:
            raise ValueError(f"the transformer has a cache enabled ({type(cache).__name__}): cached steps skip blocks, "
                             "so hooks see stale or pass-through states; call transformer.disable_cache() to capture")
        if getattr(tr, "_parallel_config", None) is not None:
            raise ValueError("context parallelism splits the image tokens across GPUs, so hooks see one shard: run one "
                             "process per GPU instead (--world-size)")
        if self.dtype == torch.float16 and not self.FLOAT16_OK:
            raise ValueError(f"{self.family.upper()} overflows float16 (diffusers clips its activations to ±65504, "
                             "which saturates the features): use bfloat16 or float32")

    #: Whether the family's activations fit float16 (FLUX's do not).
    FLOAT16_OK = True
    #: Whether the family generates clips (tokens frames' × h' × w', `token_grid(..., frames)`) rather than images.
    VIDEO = False
    #: Whether text reaches the image tokens through cross-attention (Wan: the text is never updated, no joint
    #: attention, no concept stream) rather than joint attention.
    CROSS_ATTENTION = False
    #: Text tokens a FLOP count assumes where the family does not pad its text to `max_sequence_length` (None: it does).
    FLOP_TEXT_TOKENS: int | None = None

    @property
    @abstractmethod
    def feature_blocks(self) -> nn.ModuleList:
        """The blocks whose image-token outputs are captured as features."""

    @property
    @abstractmethod
    def joint_blocks(self) -> nn.ModuleList:
        """The multi-modal (text + image) blocks that carry the concept stream."""

    def blocks(self, kind: str) -> nn.ModuleList:
        """The block list capture layers index: "feature" (feature_blocks) or "joint" (joint_blocks)."""
        if kind not in ("feature", "joint"):
            raise ValueError(f"blocks must be feature or joint, got {kind!r}")
        return self.feature_blocks if kind == "feature" else self.joint_blocks

    def block_attention(self, block: nn.Module) -> nn.Module:
        """The attention module of a joint / attention block in which image queries meet text keys (the one capture's
        hooks read)."""
        return block.attn

    @property
    def attention_blocks(self) -> list[nn.Module]:
        """Every block that mixes text and image, in forward order (the text-attention layer index)."""
        blocks = list(self.joint_blocks)
        return blocks + [b for b in self.feature_blocks if all(b is not j for j in blocks)]

    @property
    def feature_dim(self) -> int:
        cfg = self.transformer.config
        return int(cfg.num_attention_heads * cfg.attention_head_dim)

    @abstractmethod
    def image_tokens(self, block_output: Any) -> torch.Tensor:
        """The (B, N, C) image tokens out of one feature (or joint) block's output."""

    def rotate(self, x: torch.Tensor, rotary: Any, part: str) -> torch.Tensor:
        """Queries or keys x (B, L, H, D) of one block rotated as its attention rotates them.

        Args:
            rotary: the block's `image_rotary_emb` argument. FLUX.1 / FLUX.2: (cos, sin), each (S + N, D) over the
                call's [text; image] positions; None: no RoPE (SD3).
            part: "text" (the call's first L text tokens), "image" (its L image tokens) or "concept" (concept
                tokens, placed where a prompt's first text token sits: FLUX's text position zero, the identity).
        """
        if rotary is None or part == "concept":
            return x
        cos, sin = rotary
        pick = slice(None, x.shape[1]) if part == "text" else slice(-x.shape[1], None)
        return apply_rotary_emb(x, (cos[pick], sin[pick]), sequence_dim=1)

    @abstractmethod
    def sigma_of(self, timestep: torch.Tensor) -> torch.Tensor:
        """The flow-matching sigma in [0, 1] from the transformer's `timestep` argument."""

    @abstractmethod
    def timestep_for(self, sigma: float) -> float:
        """The transformer's `timestep` value for a flow-matching sigma (the inverse of `sigma_of`)."""

    # --- what capture calls: conditioning, concept stream, latents -----------------------------
    @abstractmethod
    def encode_prompts(self, prompts: Sequence[str], max_sequence_length: int) -> dict[str, torch.Tensor]:
        """The transformer's text-conditioning kwargs for B prompts (the pipeline's own encoders, no CFG rows)."""

    @abstractmethod
    def text_token_mask(self, prompts: Sequence[str], max_sequence_length: int) -> torch.Tensor:
        """(B, S) bool over the transformer's text context: which positions hold prompt tokens (not padding)."""

    def encode_concepts(self, words: Sequence[str]) -> torch.Tensor:
        """(K, C) initial concept-stream tokens, one per word, in the transformer's width: computed once per word set
        (and device, dtype), then reused."""
        key = (tuple(words), self.device, self.dtype)
        if key not in self._concept_tokens:
            with torch.no_grad():
                self._concept_tokens[key] = self._encode_concepts(key[0])
        return self._concept_tokens[key]

    @abstractmethod
    def _encode_concepts(self, words: tuple[str, ...]) -> torch.Tensor:
        """(K, C) the family's concept tokens (ConceptAttention's recipe: each word encoded alone by the pipeline's
        own text encoder, one token kept, through the transformer's text input)."""

    @abstractmethod
    def concept_temb(self, timestep: torch.Tensor, guidance: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """(B, C) modulation of the concept stream at the transformer call's `timestep` (and `guidance`),
        computed in `dtype` (called inside compiled graphs: nothing read back to the host)."""

    #: The transformer's modules `concept_temb` calls (held on the device with the first joint block under group
    #: offload, where it runs).
    CONCEPT_EMBEDDERS: tuple[str, ...] = ("time_text_embed",)

    def preprocess(self, images: Any) -> torch.Tensor:
        """(B, 3, H, W) in [−1, 1] from PIL images or a (B, 3, H, W) tensor in [0, 1] (a video family: clips)."""
        return self.pipe.image_processor.preprocess(images)

    @abstractmethod
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Clean latents x0, laid out as the transformer takes them, from images (B, 3, H, W) in [−1, 1]."""

    def transformer_inputs(self, latents: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor],
                           guidance_scale: float, height: int, width: int) -> dict[str, Any]:
        """Keyword arguments of one transformer forward on `latents` (laid out as `encode_images` gives them) at
        per-row `sigma` (B,) (real-image mode): the latents in the compute dtype, the family's timestep, its guidance
        input where the transformer embeds guidance, the text conditioning `cond` (`encode_prompts`) and the image
        positions (`position_inputs`)."""
        b = latents.shape[0]
        out = {"hidden_states": latents.to(self.dtype), "timestep": self.timestep_input(sigma), **cond,
               **self.position_inputs(b, height, width), "return_dict": False}
        guidance = self.guidance(b, guidance_scale)
        return out if guidance is None else out | {"guidance": guidance}

    def timestep_input(self, sigma: torch.Tensor) -> torch.Tensor:
        """The transformer's `timestep` argument for per-row sigmas (B,): the sigma itself in the compute dtype, on
        the execution device (FLUX.1, FLUX.2, Qwen-Image: their pipelines pass t / 1000)."""
        return sigma.to(device=self.device, dtype=self.dtype)

    def position_inputs(self, rows: int, height: int, width: int) -> dict[str, Any]:
        """The transformer's image-position arguments for `rows` images of height × width (none by default)."""
        return {}

    def guidance(self, batch: int, guidance_scale: float) -> torch.Tensor | None:
        """(B,) float32 guidance input of a guidance-distilled transformer (`guidance_embeds`: FLUX.1-dev, FLUX.2
        [dev]); None without one."""
        if not self.transformer.config.get("guidance_embeds", False):
            return None
        return torch.full((batch,), float(guidance_scale), device=self.device, dtype=torch.float32)

    @abstractmethod
    def meta_inputs(self, rows: int, height: int, width: int, text_tokens: int) -> dict[str, Any]:
        """Empty meta-device keyword arguments of one transformer forward on `rows` rows of height × width latents
        with `text_tokens` text tokens: the shapes `transformer_inputs` passes, for FLOP counts (`flops.py`)."""

    @property
    def sampling(self) -> dict:
        """Recommended sampling settings (steps, guidance, size…) from mmdiff.json, else empty."""
        return dict(self.settings.get("sampling", {}))

    # FLUX.1-dev's usual settings, used where neither the caller nor mmdiff.json says otherwise.
    SAMPLING_DEFAULTS = {"height": 512, "width": 512, "num_inference_steps": 28, "guidance_scale": 3.5,
                         "true_cfg_scale": 1.0, "negative_prompt": None}

    def sampling_kwargs(self, **overrides) -> dict:
        """Complete sampling kwargs for `generate`: the caller's values (None = unset) over the backbone's
        recommendation over SAMPLING_DEFAULTS; the text length never exceeds the tokenizer's limit."""
        if overrides.get("num_frames") is not None and not self.VIDEO:
            raise ValueError(f"{self.family} generates images: a frame count ({overrides['num_frames']}) is for video")
        out = {**self.SAMPLING_DEFAULTS, **{k: v for k, v in self.sampling.items() if k != "max_sequence_length"}}
        out.update({k: v for k, v in overrides.items() if v is not None})
        rec_len = self.sampling.get("max_sequence_length", self.max_sequence_length)
        out["max_sequence_length"] = min(overrides.get("max_sequence_length") or rec_len, self.max_sequence_length)
        if out["true_cfg_scale"] > 1 and out["negative_prompt"] is None:
            out["negative_prompt"] = ""  # true CFG needs an unconditional branch
        return out

    @property
    def max_sequence_length(self) -> int:
        """Text tokens the pipeline should pad to: the T5 tokenizer's limit, at most FLUX's 512."""
        return int(min(512, getattr(self.t5_tokenizer, "model_max_length", 512) or 512))

    @property
    def t5_tokenizer(self) -> Any:
        """The tokenizer of the long (T5) text input, whose length `max_sequence_length` counts (FLUX: the
        pipeline's second tokenizer); None when the pipeline has none."""
        return getattr(self.pipe, "tokenizer_2", None)

    def overlong_prompts(self, prompts: Sequence[str], max_len: int) -> list[tuple[int, int]]:
        """(prompt index, token count) of the prompts the T5 tokenizer will truncate at `max_len`."""
        if self.t5_tokenizer is None:
            return []
        ids = self.t5_tokenizer(list(prompts), truncation=False, add_special_tokens=True).input_ids
        return [(i, len(x)) for i, x in enumerate(ids) if len(x) > max_len]

    # --- grounding (Seg4Diff) -----------------------------------------------------------------
    def default_grounding(self) -> dict:
        """Where zero-shot segmentation reads attention unless told: mmdiff.json's "openseg" (what
        `probe-layers` found), else the family's rule, at σ 0.52 (Seg4Diff reads σ ≈ 0.5)."""
        rec = dict(self.settings.get("openseg", {}))
        return {"layer": rec.get("layer", self.GROUNDING_LAYER(len(self.attention_blocks), len(self.joint_blocks))),
                "sigma": rec.get("sigma", 0.52), "threshold": rec.get("threshold", 0.5)}

    #: (attention blocks, joint blocks) → default grounding layer. FLUX: the last double-stream block.
    GROUNDING_LAYER = staticmethod(lambda n_blocks, n_joint: n_joint - 1)

    def grounding_tokenizer(self) -> tuple[Any, int, int]:
        """(tokenizer, offset of its tokens in the transformer's text sequence, padded length) for
        reading per-word attention. FLUX: T5 (the only text tokens its blocks see)."""
        return self.pipe.tokenizer_2, 0, self.max_sequence_length

    def class_token_positions(self, prompts: Sequence[str], classes: Sequence[str]) -> list[dict[int, list[int]]]:
        """Per prompt: class id → text positions of the tokens that spell that class name (every occurrence).

        A class name matches the prompt's text case-insensitively, with or without spaces, hyphens or
        underscores between its letters and with a plural ending, so VOC's "diningtable" finds "dining
        tables"; the match's characters are mapped to the tokens the pipeline padded (offsets of the
        fast tokenizer). Class 0 (the background) is never looked up.
        """
        tok, offset, length = self.grounding_tokenizer()
        enc = tok(list(prompts), padding="max_length", padding_side="right", max_length=length, truncation=True,
                  return_offsets_mapping=True)  # right: token i of the prompt is position i
        patterns = {c: _class_pattern(name) for c, name in enumerate(classes) if c > 0}
        out = []
        for prompt, spans in zip(prompts, enc["offset_mapping"]):
            found: dict[int, list[int]] = {}
            for c, pat in patterns.items():
                for m in pat.finditer(prompt):
                    found.setdefault(c, []).extend(
                        offset + i for i, (a, b) in enumerate(spans) if b > a and a < m.end() and b > m.start())
                if c in found:
                    found[c] = sorted(set(found[c]))
            out.append(found)
        return out

    # --- latents ----------------------------------------------------------------------------
    @torch.no_grad()
    def vae_latents(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C_vae, H/f, W/f) posterior means of images (B, 3, H, W) in [−1, 1], shifted and scaled
        as the transformer sees them (deterministic: the mode, not a sample)."""
        vae = self.pipe.vae
        # The execution device, as the pipeline's own decode: under offload vae.device is cpu or meta between calls.
        lat = vae.encode(images.to(device=self.device, dtype=vae.dtype)).latent_dist.mode()
        return (lat - vae.config.shift_factor) * vae.config.scaling_factor

    # --- geometry ---------------------------------------------------------------------------
    @staticmethod
    def vae_scale_factor(vae_config: dict) -> int:
        """Pixels per latent pixel, as the family's pipeline derives it from its VAE config (AutoencoderKL and
        FLUX.2's: 2^(blocks − 1)); `loading.meta_backbone` builds geometry from the config files alone."""
        return 2 ** (len(vae_config["block_out_channels"]) - 1)

    @property
    @abstractmethod
    def pixels_per_token(self) -> int:
        """Image pixels along one side of one image token (VAE scale factor × patch size)."""

    @property
    def size_range(self) -> tuple[int, int]:
        """(smallest, largest) image side: two tokens, up to twice the pipeline's native side (its
        `default_sample_size` latent pixels; FLUX.1-dev: 1024 → 2048). RoPE has no hard limit; beyond
        that the model has never seen such grids."""
        native = int(getattr(self.pipe, "default_sample_size", 128)) * int(self.pipe.vae_scale_factor)
        return 2 * self.pixels_per_token, 2 * native

    def token_grid(self, height: int, width: int, frames: int | None = None) -> tuple[int, ...]:
        """(h', w') image tokens; a video family's (f', h', w') for a clip of `frames` frames."""
        if frames is not None:
            raise ValueError(f"{self.family} generates images, not clips of {frames} frames")
        p = self.pixels_per_token
        if height % p or width % p:
            raise ValueError(f"height and width must be multiples of {p} for this backbone, got {height}×{width}")
        return height // p, width // p

    def default_layers(self, count: int = 4, blocks: str = "feature") -> tuple[int, ...]:
        """`count` blocks of the `blocks` list spread across depth, as the paper's {4, 15, 26, 37} of 38.

        Evenly spaced from round(4/38 · n) to n − 1, which gives exactly {4, 15, 26, 37} at n = 38. The
        backbone's recommended `capture_layers` (mmdiff.json) are feature blocks.
        """
        if self.settings.get("capture_layers") and blocks == "feature":
            return tuple(self.settings["capture_layers"])
        n = len(self.blocks(blocks))
        if n <= count:
            return tuple(range(n))
        first = max(0, round(4 * n / 38))
        last = n - 1
        picks = torch.linspace(first, last, count).round().long().tolist()
        return tuple(sorted(set(int(i) for i in picks)))

    def default_concept_layers(self) -> tuple[int, ...]:
        """The last joint blocks (ConceptAttention's FLUX default is 15–18 of 19: the last ~20%)."""
        n = len(self.joint_blocks)
        k = max(1, round(4 * n / 19))
        return tuple(range(n - k, n))

    # --- sampling ---------------------------------------------------------------------------
    #: The pipeline's fallback for the scheduler's max_shift (FluxPipeline 1.15, SD3 1.16).
    MAX_SHIFT_DEFAULT = 1.15

    def schedule_mu(self, image_seq_len: int, num_inference_steps: int | None = None) -> float | None:
        """The resolution-dependent shift the pipeline passes to its scheduler (None: static shift). FLUX.1 and SD3
        ignore the step count; FLUX.2's shift depends on it."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        cfg = self.pipe.scheduler.config
        if not cfg.get("use_dynamic_shifting"):
            return None
        return calculate_shift(
            image_seq_len,
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", self.MAX_SHIFT_DEFAULT),
        )

    @property
    def default_sigmas(self) -> tuple[float, ...] | None:
        """The capture sigmas this backbone is meant to be read at, where they are not the paper's (None: CaptureSpec's
        default, the paper's (0.78, 0.52, 0.26, 0.001))."""
        return None

    def check_schedule(self, schedule: Any) -> None:
        """Refuse, in one line, a contract schedule (backbones.schedule) this family should not run. Any by default."""

    def cfg_in_batch(self, sampling: dict) -> bool:
        """Whether the pipeline runs classifier-free guidance as [uncond; cond] rows of one call with
        these sampling kwargs. FLUX runs true CFG as separate calls (conditional first): never."""
        return False

    def pipeline_kwargs(self, sampling: dict) -> dict:
        """`sampling_kwargs` output → the keyword arguments this family's pipeline call accepts."""
        return dict(sampling)

    def run_pipeline(self, **kwargs) -> Any:
        """One call of the family's pipeline on `sampling_kwargs`-style arguments (`sigmas=`: the contract's pre-shift
        inputs) → its images (a video family's: the frames of each clip)."""
        return self.pipe(**self.pipeline_kwargs(kwargs)).images

    # --- identity ---------------------------------------------------------------------------
    def identity(self) -> dict:
        """Name, a hash of the transformer config, the weights fingerprint and any LoRA: what heads check
        and what a dataset's fingerprint holds. How the weights are stored (fp8, int8, offloaded) is not
        part of it: storage variants of the same weights compute the same features up to rounding."""
        cfg = dict(self.transformer.config)
        blob = json.dumps({k: v for k, v in sorted(cfg.items()) if not k.startswith("_") and k != "quantization_config"},
                          sort_keys=True, default=str)
        ident = {
            "family": self.family,
            "name": self.name,
            "config_sha256": hashlib.sha256(blob.encode()).hexdigest()[:16],
            "weights": self.weights_id,
        }
        lora = self.lora_identity()
        return ident | ({"lora": lora} if lora else {})

    def lora_identity(self) -> list[dict]:
        """The LoRA adapters that change what the transformer computes, sorted by name: enabled ones with
        their scale and a sha256 of their weights, and fused ones ("fused": true; their weights are in
        the base weights now). Empty without LoRA (peft not even imported)."""
        from_pipe = set(getattr(self.pipe, "_merged_adapters", None) or ())  # diffusers' fuse_lora bookkeeping
        tr = self.transformer
        layers = []
        if getattr(tr, "_hf_peft_config_loaded", False):
            from peft.tuners.tuners_utils import BaseTunerLayer

            layers = [m for m in tr.modules() if isinstance(m, BaseTunerLayer)]
        out = {}
        for m in layers:
            if m.disable_adapters and not m.merged_adapters:
                continue
            for name in set(m.active_adapters) | set(m.merged_adapters):
                if name in out or name not in getattr(m, "scaling", {}):
                    continue
                scale = m.scaling[name] / (m.lora_alpha[name] / m.r[name])  # set_adapters' / fuse_lora's weight
                out[name] = {"name": name, "scale": round(float(scale), 6), "sha256": self._lora_sha256(name),
                             "fused": name in m.merged_adapters}
        for name in from_pipe - set(out):  # fused, then unloaded: only the name is left
            out[name] = {"name": name, "fused": True}
        return [out[k] for k in sorted(out)]

    def _lora_sha256(self, name: str) -> str:
        h = hashlib.sha256()
        for pname, p in sorted(self.transformer.named_parameters()):
            if "lora_" in pname and pname.endswith(f".{name}.weight"):
                h.update(pname.encode())
                if p.device.type != "meta":  # sequential offload keeps them on meta between calls
                    h.update(p.detach().to("cpu", torch.float32).numpy().tobytes())
        return h.hexdigest()[:16]


class JointBlocksBackbone(Backbone):
    """A family whose blocks are all joint (MM-DiT) blocks returning (text, image) — SD3 / SD3.5, Qwen-Image: features
    and the concept stream both come from `transformer_blocks`."""

    @property
    def feature_blocks(self) -> nn.ModuleList:
        return self.transformer.transformer_blocks

    @property
    def joint_blocks(self) -> nn.ModuleList:
        return self.transformer.transformer_blocks

    def image_tokens(self, block_output: Any) -> torch.Tensor:
        return block_output[1]  # (text, image) → image, (B, N, C); SD3's last block returns (None, image)

    # Seg4Diff's expert layer of SD3-medium is block 9 of 24: the same relative depth elsewhere.
    GROUNDING_LAYER = staticmethod(lambda n_blocks, n_joint: round(9 * n_blocks / 24))
