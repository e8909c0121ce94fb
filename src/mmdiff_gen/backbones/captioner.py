"""A frozen image-text-to-text model (a VLM: Gemma 3, LLaVA, Qwen2-VL …) that captions real images, giving each the
prompt it is noised and conditioned on (MMDiff §4.4 captions them with Gemma-3-4B)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .loading import _REPO_ID, BackboneNotFound, _weights_id, hub_cache, hub_snapshot, safetensors_only

DEFAULT_MODEL = "google/gemma-3-4b-it"  # MMDiff §4.4: "captioning each image with Gemma-3-4B"
# The caption stands in for the prompt the image could have been generated from, so it should read like a
# text-to-image prompt — one short factual sentence naming the main objects — not like a VLM's paragraph, which
# the DiT's text encoder would truncate or half-read.
CAPTION_PROMPT = ("Write a short text-to-image prompt for this image: one factual sentence of at most 30 words "
                  "that names the main objects, with their colours and where they are. Describe only what is "
                  "visible. Answer with the sentence alone.")
MAX_NEW_TOKENS = 64  # a 30-word sentence is about 40 tokens; a caption cut at the limit is kept as it is


def resolve(model: str) -> Path:
    """A local model folder (with config.json) or a hub id found in the local HF cache → its folder; anything
    else is BackboneNotFound in one line saying how to get it."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BackboneNotFound(f"{path} is not a transformers model folder (no config.json)")
        return path
    if not _REPO_ID.fullmatch(model):
        raise BackboneNotFound(f"no model folder at {path}")
    folder = hub_snapshot(model)
    if folder is None:
        raise BackboneNotFound(f"{model!r} is not in the local Hugging Face cache ({hub_cache()}); on a machine with "
                               f"internet run `hf download {model}` (accept the model's licence on the Hub first), "
                               "or pass a local folder")
    if not (folder / "config.json").is_file():
        raise BackboneNotFound(f"the cached snapshot of {model!r} has no config.json: re-run `hf download {model}`")
    return folder


def describe(model: str, prompt: str = CAPTION_PROMPT, max_new_tokens: int = MAX_NEW_TOKENS) -> dict:
    """What `Captioner.identity()` of `model` loaded with these settings will be, read without loading it."""
    return {"model": model, "weights": _weights_id(resolve(model), files="*.safetensors"), "prompt": prompt,
            "max_new_tokens": max_new_tokens}


class Captioner:
    """One caption per image: the model's greedy answer to `prompt` about it, in a chat turn.

    Args:
        model: a transformers image-text-to-text model (AutoModelForImageTextToText), placed by the caller; it
            computes on its own device and dtype.
        processor: its AutoProcessor (image processor, tokenizer, chat template); set to pad on the left, as
            batched generation with a decoder-only model needs (new tokens follow every row's last token).
        name: how the user named the model (recorded beside the captions).
        weights_id: a fingerprint of its weights ("" for a model built in memory).
        prompt: the instruction that follows the image in the user turn.
        max_new_tokens: the longest caption, in tokens.
    """

    def __init__(self, model, processor, *, name: str, weights_id: str = "", prompt: str = CAPTION_PROMPT,
                 max_new_tokens: int = MAX_NEW_TOKENS):
        if not prompt.strip():
            raise ValueError("the captioning prompt is empty")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        tok = processor.tokenizer
        tok.padding_side = "left"
        if tok.pad_token is None:  # e.g. Llama-based LLaVAs: padded positions are masked, any id does
            tok.pad_token = tok.eos_token
        self.name, self.weights_id, self.prompt, self.max_new_tokens = name, weights_id, prompt, max_new_tokens
        # Greedy, whatever sampling the checkpoint's generation_config asks for (Gemma 3's: top-k 64, top-p 0.95);
        # its stop tokens are kept (Gemma 3 ends a turn with <end_of_turn>, not <eos>).
        self.generation = copy.deepcopy(model.generation_config)
        self.generation.update(do_sample=False, num_beams=1, top_k=None, top_p=None, temperature=None,
                               max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)

    @classmethod
    def load(cls, model: str = DEFAULT_MODEL, *, device: str | torch.device, dtype: torch.dtype,
             prompt: str = CAPTION_PROMPT, max_new_tokens: int = MAX_NEW_TOKENS) -> "Captioner":
        """From a local folder or a hub id in the local HF cache; weights read from safetensors only (never
        unpickled), straight onto `device` in `dtype`."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        folder = resolve(model)
        safetensors_only(folder, f"captioner {model}")
        try:
            processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
            vlm = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype, use_safetensors=True,
                                                              local_files_only=True, device_map={"": str(device)})
        except OSError as err:  # no safetensors weights, a missing processor file …
            first = str(err).strip().splitlines()[0]
            raise BackboneNotFound(f"could not load {model!r} from {folder}: {first}") from None
        if getattr(processor, "tokenizer", None) is None or getattr(processor, "image_processor", None) is None:
            raise ValueError(f"{model!r} has no image-and-text processor: not an image-text-to-text model")
        return cls(vlm, processor, name=model, weights_id=_weights_id(folder, files="*.safetensors"), prompt=prompt,
                   max_new_tokens=max_new_tokens)

    def identity(self) -> dict:
        """What captions made by it record: model, weights, prompt and length (see `describe`)."""
        return {"model": self.name, "weights": self.weights_id, "prompt": self.prompt,
                "max_new_tokens": self.max_new_tokens}

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray]) -> list[str]:
        """(H, W, 3) uint8 images (sizes may differ) → one caption each, on one line, in one batch."""
        from PIL import Image

        turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}]
        text = self.processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
        # The template writes the BOS itself where the model has one; the tokenizer must not add a second.
        bos = self.processor.tokenizer.bos_token
        pictures = [[Image.fromarray(im)] for im in images]  # one image per conversation
        inputs = self.processor(text=[text] * len(images), images=pictures, padding=True, return_tensors="pt",
                                add_special_tokens=not (bos and text.startswith(bos)))
        inputs = inputs.to(self.model.device, dtype=self.model.dtype)  # dtype: floating tensors (pixels) only
        out = self.model.generate(**inputs, generation_config=self.generation)  # (B, prompt + new tokens)
        new = out[:, inputs["input_ids"].shape[1]:]  # left padding: every row's answer starts here
        return [" ".join(t.split()) for t in self.processor.batch_decode(new, skip_special_tokens=True)]
