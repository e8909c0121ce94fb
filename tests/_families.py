"""The backbone families the product supports, as the parametrised contract tests (`test_families.py`) build them,
and one hand-written reference per family for a joint block carrying the concept stream.

Each reference runs the block's attention over [text; image; concepts] (SD3: [image; text; concepts]) explicitly,
with a mask: text and image queries see text and image keys (Qwen-Image: only the prompt's unpadded text keys),
concept queries see image and concept keys. Concepts take the text stream's weights and their own modulation, at a
prompt's first text position. Written from diffusers 0.42's block code, independent of `mmdiff_gen.capture`.

A reference takes the block, the keyword arguments the block received (a forward pre-hook's), the concept stream
entering it (B, K, C) and its modulation, and returns {"c": stream after the block, "o_x": (B, N, H·D) image and
"o_c": (B, K, H·D) concept attention outputs before the output projections, "p_text": (B, N, S) image→text attention
probabilities, mean over heads}; FLUX.1's also the stock outputs "x" and "t".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.pipelines.flux2.pipeline_flux2 import format_input

from mmdiff_gen.backbones import Flux2Backbone, FluxBackbone, QwenImageBackbone, SD3Backbone
from mmdiff_gen.backbones.tiny import build_tiny_flux, build_tiny_flux2, build_tiny_qwenimage, build_tiny_sd3


def _attend(q, k, v, allowed, queries: slice, text: slice):
    """Masked attention over the joint sequence (B, L, H, D): the output (B, L, H·D) and the mean-over-heads
    probabilities of the `queries` rows on the `text` keys (B, n, S)."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, D)
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    logits = logits.masked_fill(~allowed, float("-inf"))
    probs = logits.softmax(-1)
    out = (probs @ v).transpose(1, 2).flatten(2)
    return out, probs[:, :, queries, text].mean(1)


def _allowed(b, first, mid, last, image_first=False, text_keys=None):
    """(B, 1, L, L) mask over [first; mid; last] = [text; image; concepts] (SD3, `image_first`: [image; text;
    concepts]): text and image see each other, concepts see the image and themselves; `text_keys` (B, S) bool masks
    text keys (Qwen-Image's padding)."""
    n = first + mid + last
    image, text = (slice(0, first), slice(first, first + mid)) if image_first else (slice(first, first + mid),
                                                                                    slice(0, first))
    allowed = torch.zeros(b, 1, n, n, dtype=torch.bool)
    allowed[:, :, : first + mid, : first + mid] = True
    allowed[:, :, first + mid :, first + mid :] = True
    allowed[:, :, first + mid :, image] = True
    if text_keys is not None:
        allowed[:, :, : first + mid, text] &= text_keys[:, None, None, :]
    return allowed


def _joint_qkv(attn, nt, nx, nc):
    """Queries, keys and values (B, S + N + K, H, D) of [text; image; concepts]: text and concepts through the added
    (text) projections and norms, the image through the block's own."""
    heads = lambda t: t.unflatten(-1, (attn.heads, -1))  # noqa: E731
    q = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(nt))), attn.norm_q(heads(attn.to_q(nx))),
                   attn.norm_added_q(heads(attn.add_q_proj(nc)))], 1)
    k = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(nt))), attn.norm_k(heads(attn.to_k(nx))),
                   attn.norm_added_k(heads(attn.add_k_proj(nc)))], 1)
    v = torch.cat([heads(attn.add_v_proj(nt)), heads(attn.to_v(nx)), heads(attn.add_v_proj(nc))], 1)
    return q, k, v


def _flux_rope(q, k, rotary, concepts: int):
    """FLUX.1 / FLUX.2 RoPE: `rotary` (cos, sin) over the call's [text; image]; concepts at text position zero (cos 1,
    sin 0: the identity)."""
    cos, sin = rotary
    rot = (torch.cat([cos, torch.ones(concepts, cos.shape[1])]), torch.cat([sin, torch.zeros(concepts, sin.shape[1])]))
    return apply_rotary_emb(q, rot, sequence_dim=1), apply_rotary_emb(k, rot, sequence_dim=1)


def flux_reference(block, kw, c, temb_c):
    attn = block.attn
    x, txt, temb = kw["hidden_states"], kw["encoder_hidden_states"], kw["temb"]
    nx, gx, shx, scx, gmx = block.norm1(x, emb=temb)
    nt, gt, sht, sct, gmt = block.norm1_context(txt, emb=temb)
    nc, gc, shc, scc, gmc = block.norm1_context(c, emb=temb_c)
    s, n, kk = txt.shape[1], x.shape[1], c.shape[1]
    q, k, v = _joint_qkv(attn, nt, nx, nc)
    q, k = _flux_rope(q, k, kw["image_rotary_emb"], kk)
    out, p_text = _attend(q, k, v, _allowed(x.shape[0], s, n, kk), slice(s, s + n), slice(0, s))
    o_t, o_x, o_c = out.split([s, n, kk], dim=1)

    def finish(h, o, proj, g, sh, sc, gm, norm2, ff):
        h = h + g[:, None] * proj(o)
        return h + gm[:, None] * ff(norm2(h) * (1 + sc[:, None]) + sh[:, None])

    return {"x": finish(x, o_x, attn.to_out[0], gx, shx, scx, gmx, block.norm2, block.ff),
            "t": finish(txt, o_t, attn.to_add_out, gt, sht, sct, gmt, block.norm2_context, block.ff_context),
            "c": finish(c, o_c, attn.to_add_out, gc, shc, scc, gmc, block.norm2_context, block.ff_context),
            "o_x": o_x, "o_c": o_c, "p_text": p_text}


def sd3_reference(block, kw, c, temb_c):
    attn = block.attn
    heads = lambda t: t.unflatten(-1, (attn.heads, -1))  # noqa: E731
    norm = lambda m, t: t if m is None else m(t)  # noqa: E731
    x, txt, temb = kw["hidden_states"], kw["encoder_hidden_states"], kw["temb"]
    last = block.context_pre_only
    nx = block.norm1(x, emb=temb)[0]
    if last:
        nt, nc = block.norm1_context(txt, temb), block.norm1_context(c, temb_c)
    else:
        nt = block.norm1_context(txt, emb=temb)[0]
        nc, gc, shc, scc, gmc = block.norm1_context(c, emb=temb_c)
    q = torch.cat([norm(attn.norm_q, heads(attn.to_q(nx))), norm(attn.norm_added_q, heads(attn.add_q_proj(nt))),
                   norm(attn.norm_added_q, heads(attn.add_q_proj(nc)))], 1)
    k = torch.cat([norm(attn.norm_k, heads(attn.to_k(nx))), norm(attn.norm_added_k, heads(attn.add_k_proj(nt))),
                   norm(attn.norm_added_k, heads(attn.add_k_proj(nc)))], 1)
    v = torch.cat([heads(attn.to_v(nx)), heads(attn.add_v_proj(nt)), heads(attn.add_v_proj(nc))], 1)
    n, s, kk = x.shape[1], txt.shape[1], c.shape[1]
    out, p_text = _attend(q, k, v, _allowed(x.shape[0], n, s, kk, image_first=True), slice(0, n), slice(n, n + s))
    o_x, _, o_c = out.split([n, s, kk], dim=1)
    if not last:
        c = c + gc[:, None] * attn.to_add_out(o_c)
        c = c + gmc[:, None] * block.ff_context(block.norm2_context(c) * (1 + scc[:, None]) + shc[:, None])
    return {"c": c, "o_x": o_x, "o_c": o_c, "p_text": p_text}


def flux2_reference(block, kw, c, mod_c):
    from diffusers.models.transformers.transformer_flux2 import Flux2Modulation

    attn, x, txt = block.attn, kw["hidden_states"], kw["encoder_hidden_states"]
    (sh, sc, _), _ = Flux2Modulation.split(kw["temb_mod_img"], 2)
    (tsh, tsc, _), _ = Flux2Modulation.split(kw["temb_mod_txt"], 2)
    (csh, csc, cg), (csh2, csc2, cg2) = Flux2Modulation.split(mod_c, 2)
    nx, nt = block.norm1(x) * (1 + sc) + sh, block.norm1_context(txt) * (1 + tsc) + tsh
    nc = block.norm1_context(c) * (1 + csc) + csh
    s, n, kk = txt.shape[1], x.shape[1], c.shape[1]
    q, k, v = _joint_qkv(attn, nt, nx, nc)
    q, k = _flux_rope(q, k, kw["image_rotary_emb"], kk)
    out, p_text = _attend(q, k, v, _allowed(x.shape[0], s, n, kk), slice(s, s + n), slice(0, s))
    _, o_x, o_c = out.split([s, n, kk], dim=1)
    c = c + cg * attn.to_add_out(o_c)
    c = c + cg2 * block.ff_context(block.norm2_context(c) * (1 + csc2) + csh2)
    return {"c": c, "o_x": o_x, "o_c": o_c, "p_text": p_text}


def _rope_complex(x, freqs):
    """x (B, L, H, D) rotated by complex freqs (L, D/2), pairs of adjacent channels as complex numbers."""
    z = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(z * freqs[None, :, None]).flatten(3).type_as(x)


def qwenimage_reference(block, kw, c, temb_c):
    attn, x, txt = block.attn, kw["hidden_states"], kw["encoder_hidden_states"]

    def modulate(normed, mod):  # mod (B, 3C) = shift, scale, gate
        shift, scale, gate = mod[:, None].chunk(3, dim=-1)
        return normed * (1 + scale) + shift, gate

    im1, tm1 = block.img_mod(kw["temb"]).chunk(2, -1)[0], block.txt_mod(kw["temb"]).chunk(2, -1)[0]
    cm1, cm2 = block.txt_mod(temb_c).chunk(2, -1)
    nx, _ = modulate(block.img_norm1(x), im1)
    nt, _ = modulate(block.txt_norm1(txt), tm1)
    nc, gc = modulate(block.txt_norm1(c), cm1)
    img_f, txt_f = kw["image_rotary_emb"]  # (N, D/2), (S, D/2) complex; concepts at the first text position
    s, n, kk = txt.shape[1], x.shape[1], c.shape[1]
    rot = torch.cat([txt_f[:s], img_f, txt_f[:1].expand(kk, -1)])
    q, k, v = _joint_qkv(attn, nt, nx, nc)
    q, k = _rope_complex(q, rot), _rope_complex(k, rot)
    mask = kw.get("encoder_hidden_states_mask")
    out, p_text = _attend(q, k, v, _allowed(x.shape[0], s, n, kk, text_keys=mask), slice(s, s + n), slice(0, s))
    _, o_x, o_c = out.split([s, n, kk], dim=1)
    c = c + gc * attn.to_add_out(o_c)
    nc2, gc2 = modulate(block.txt_norm2(c), cm2)
    c = c + gc2 * block.txt_mlp(nc2)
    return {"c": c, "o_x": o_x, "o_c": o_c, "p_text": p_text}


@dataclass(frozen=True)
class Family:
    """One family as the contract tests run it: a tiny pipeline (64×64 images = 8×8 image tokens), its guidance
    as its pipeline runs it, and its reference block."""

    name: str  # the test id
    family: str  # what the adapter records (`Backbone.family`)
    adapter: type
    build: Callable
    cfg: dict  # sampling kwargs that turn its classifier-free guidance on
    cfg_calls: int  # transformer calls per step under CFG (SD3 batches [uncond; cond] rows in one)
    timestep_scale: float  # the transformer's timestep per unit of sigma
    concept_layers: tuple[int, ...]  # the joint blocks whose maps the reference test reads
    reference: Callable
    pipeline: str = ""  # model_index.json's _class_name
    # The token ids of the text sequence the transformer receives for a prompt (where openseg reads a class's columns),
    # as the pipeline tokenizes it.
    text_ids: Callable | None = None


FAMILIES = {
    "flux": Family("flux", "flux", FluxBackbone, lambda: build_tiny_flux(seed=0), dict(true_cfg_scale=3.0, negative_prompt=""),
                   2, 1.0, (0, 1), flux_reference, "FluxPipeline",
                   lambda pipe, p: pipe.tokenizer_2(p).input_ids),  # T5's tokens open the text (no BOS)
    "sd3": Family("sd3", "sd3", SD3Backbone, lambda: build_tiny_sd3(seed=0, qk_norm="rms_norm", dual_attention_layers=(0,)),
                  dict(guidance_scale=4.0), 1, 1000.0, (2, 3), sd3_reference, "StableDiffusion3Pipeline",
                  lambda pipe, p: pipe.tokenizer(p).input_ids),  # CLIP-L's 77 open the joint context
    "flux2": Family("flux2", "flux2", Flux2Backbone, lambda: build_tiny_flux2(seed=0, distilled=False),
                    dict(guidance_scale=3.0), 2, 1.0, (0, 1), flux2_reference, "Flux2KleinPipeline",
                    lambda pipe, p: pipe.tokenizer(pipe.tokenizer.apply_chat_template(  # [klein]: one prompt's turn
                        [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True,
                        enable_thinking=False)).input_ids),
    "flux2-dev": Family("flux2-dev", "flux2", Flux2Backbone, lambda: build_tiny_flux2(seed=0, dev=True),
                        dict(guidance_scale=4.0), 1, 1.0, (0, 1), flux2_reference, "Flux2Pipeline",
                        lambda pipe, p: pipe.tokenizer.apply_chat_template(  # [dev]: its system message first
                            format_input([p], pipe.system_message), tokenize=True, add_generation_prompt=False,
                            return_dict=True)["input_ids"][0]),
    "qwenimage": Family("qwenimage", "qwenimage", QwenImageBackbone, lambda: build_tiny_qwenimage(seed=0),
                        dict(true_cfg_scale=4.0, negative_prompt=""), 2, 1.0, (2, 3), qwenimage_reference,
                        "QwenImagePipeline",  # the templated prompt, its system prompt dropped
                        lambda pipe, p: pipe.tokenizer(pipe.prompt_template_encode.format(p)).input_ids[
                            pipe.prompt_template_encode_start_idx:]),
}


class Recorder:
    """Reference hooks, independent of mmdiff_gen: every transformer call's timestep and the image tokens of every
    listed block, read from the block's output as diffusers 0.42 returns it: (text, image) pairs, or FLUX.2's
    single-stream [text; image] tensor (its last `image_tokens`)."""

    def __init__(self, transformer, blocks, image_tokens: int | None = None):
        self.timesteps, self.outputs, self.n = [], [], image_tokens
        self.handles = [transformer.register_forward_pre_hook(self._pre, with_kwargs=True)]
        self.handles += [b.register_forward_hook(self._out(i)) for i, b in enumerate(blocks)]

    def _pre(self, _m, _a, kwargs):
        self.timesteps.append(kwargs["timestep"].detach().clone())
        self.outputs.append({})

    def _out(self, i):
        def hook(_m, _i, out):
            self.outputs[-1][i] = (out[1] if isinstance(out, tuple) else out[:, -self.n:]).detach().clone()
        return hook

    def close(self):
        for h in self.handles:
            h.remove()
