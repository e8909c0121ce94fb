"""Every supported family's released transformer, counted on the meta device (no weights): size, tokens, FLOPs per
forward, the FLOPs of a generation under its recommended sampling, and the heads' share of it.

One command, one run:

    python bench/families.py [--json out.json]
    python bench/families.py --smoke     # two families at 512²: seconds (tests/test_benches.py)

Per family (FLUX.1-dev, SD3.5-large, FLUX.2-dev, Qwen-Image): transformer parameters, blocks and width; image tokens
and one forward's FLOPs at 512² and 1024² (text as each pipeline pads it: FLUX.1 / FLUX.2 512 tokens, SD3 77 CLIP +
256 T5, Qwen-Image unpadded: a 64-token caption); the contract's schedule at the recommended steps under the released
scheduler config (how many extra forwards the paper's sigmas cost); the generation's FLOPs (steps × rows per step +
the extra forwards) against the seg, saliency and depth heads at the family's width; the features one image
captures (4 layers × 4 sigmas, bf16). The text encoders and the VAE are not counted (they only lower the share).

Video (Wan 2.1 T2V 1.3B and 14B, Wan 2.2 TI2V 5B): one clip of 81 frames at 480×832 (and 720×1280 for 14B) = 21
latent frames, TI2V's 121 frames at 704×1280 = 31 latent frames of 22×40 tokens (its VAE: 16× in space); text
padded to 512 umT5 tokens; 50 UniPC steps, CFG 5 as a second call; the heads run once per latent frame.
"""

from __future__ import annotations

import argparse
import json

from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from mmdiff_gen.backbones import Flux2Backbone, FluxBackbone, QwenImageBackbone, SD3Backbone, WanBackbone
from mmdiff_gen.backbones.flops import config_backbone
from mmdiff_gen.backbones.flux import FLUX_DEV
from mmdiff_gen.backbones.flux2 import FLUX2_DEV
from mmdiff_gen.backbones.qwenimage import QWEN_IMAGE
from mmdiff_gen.backbones.sd3 import SD35_LARGE
from mmdiff_gen.backbones.wan import WAN_2_1_T2V_1_3B, WAN_2_1_T2V_14B, WAN_2_2_TI2V_5B
from mmdiff_gen.capture import CaptureSpec, plan_schedule
from mmdiff_gen.jobs.cost import generation_cost

_DYNAMIC = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, shift=3.0,
                use_dynamic_shifting=True)
# family: (adapter, transformer class, config, scheduler_config.json, recommended steps, transformer rows per step,
#          text tokens of a FLOP count, sampling in words)
FAMILIES = {
    "FLUX.1-dev": (FluxBackbone, "FluxTransformer2DModel", FLUX_DEV, _DYNAMIC, 28, 1, 512,
                   "28 steps, guidance 3.5 (distilled: one call per step)"),
    "SD3.5-large": (SD3Backbone, "SD3Transformer2DModel", SD35_LARGE, dict(shift=3.0), 28, 2, 256,
                    "28 steps, CFG 3.5 ([uncond; cond] rows)"),
    "FLUX.2-dev": (Flux2Backbone, "Flux2Transformer2DModel", FLUX2_DEV, _DYNAMIC, 50, 1, 512,
                   "50 steps, guidance 4 (distilled: one call per step)"),
    "Qwen-Image": (QwenImageBackbone, "QwenImageTransformer2DModel", QWEN_IMAGE,
                   dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
                        shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True), 50, 2, 64,
                   "50 steps, true CFG 4 (a second call)"),
}

# Wan: (config, VAE's spatial factor, clips (height, width, frames, flow_shift: 3 at 480p, 5 at 720p)); 50 UniPC
# steps, CFG 5. Wan 2.2 TI2V 5B: its VAE compresses 16× in space, its default clip is 121 frames at 704×1280.
VIDEO = {
    "Wan2.1-T2V-1.3B": (WAN_2_1_T2V_1_3B, 8, ((480, 832, 81, 3.0),)),
    "Wan2.1-T2V-14B": (WAN_2_1_T2V_14B, 8, ((480, 832, 81, 3.0), (720, 1280, 81, 5.0))),
    "Wan2.2-TI2V-5B": (WAN_2_2_TI2V_5B, 16, ((704, 1280, 121, 5.0),)),
}
VIDEO_STEPS, VIDEO_ROWS = 50, 2


def measure_video(name: str) -> dict:
    config, vae_factor, clips = VIDEO[name]
    bb = config_backbone(WanBackbone, "WanTransformer3DModel", config, vae_scale_factor=vae_factor, name=name)
    out = {"sampling": f"{VIDEO_STEPS} UniPC steps, CFG 5 (a second call)",
           "params": sum(p.numel() for p in bb.transformer.parameters()), "blocks": len(bb.feature_blocks),
           "width": bb.feature_dim, "clips": {}}
    for h, w, frames, shift in clips:
        bb.pipe.scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                    flow_shift=shift)
        plan = plan_schedule(bb, CaptureSpec(), VIDEO_STEPS, h, w, frames)
        cost = generation_cost(bb, size=h, width=w, frames=frames, steps=VIDEO_STEPS, rows_per_step=VIDEO_ROWS,
                               extra_forwards=len(plan.extra), text_tokens=512)
        grid = bb.token_grid(h, w, frames)
        tokens = grid[0] * grid[1] * grid[2]
        out["clips"][f"{frames}×{h}×{w}"] = {"grid": grid, "tokens": tokens, "extra_forwards": len(plan.extra), **cost,
                                            "features_bytes": 4 * 4 * tokens * bb.feature_dim * 2}
    return out


def measure(name: str, sizes: tuple[int, ...]) -> dict:
    adapter, cls, config, scheduler, steps, rows, text, sampling = FAMILIES[name]
    bb = config_backbone(adapter, cls, config, vae_scale_factor=8, name=name)
    bb.pipe.scheduler = FlowMatchEulerDiscreteScheduler(**scheduler)  # the contract's schedule needs it
    out = {"sampling": sampling, "params": sum(p.numel() for p in bb.transformer.parameters()),
           "feature_blocks": len(bb.feature_blocks), "joint_blocks": len(bb.joint_blocks), "width": bb.feature_dim,
           "sizes": {}}
    for size in sizes:
        plan = plan_schedule(bb, CaptureSpec(), steps, size, size)
        cost = generation_cost(bb, size=size, steps=steps, rows_per_step=rows, extra_forwards=len(plan.extra),
                               text_tokens=text)
        h, w = bb.token_grid(size, size)
        out["sizes"][size] = {"tokens": h * w, "extra_forwards": len(plan.extra), **cost,
                              "features_bytes": 4 * 4 * h * w * bb.feature_dim * 2}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="FLUX.2-dev and Qwen-Image at 512², Wan 1.3B only")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)
    names, sizes = (["FLUX.2-dev", "Qwen-Image"], (512,)) if args.smoke else (list(FAMILIES), (512, 1024))
    res = {name: measure(name, sizes) for name in names}
    videos = ["Wan2.1-T2V-1.3B"] if args.smoke else list(VIDEO)
    video = {name: measure_video(name) for name in videos}
    print("| family | transformer | blocks (feature / joint), width | size | tokens | TFLOP / forward | "
          "recommended sampling | extra forwards | PFLOP / generation | heads (seg, sal., depth) | heads' share | "
          "unified head's share | features / image (bf16) |")
    print("|---" * 13 + "|")
    for name, r in res.items():
        for size, s in r["sizes"].items():
            heads = ", ".join(f"{s['heads'][t] / 1e12:.2f}" for t in ("seg", "saliency", "depth"))
            print(f"| {name} | {r['params'] / 1e9:.1f} B | {r['feature_blocks']} / {r['joint_blocks']}, {r['width']} | "
                  f"{size}² | {s['tokens']} | {s['forward'] / 1e12:.1f} | {r['sampling']} | {s['extra_forwards']} | "
                  f"{s['generation'] / 1e15:.2f} | {heads} TFLOP | {s['heads_share'] * 100:.2f}% | "
                  f"{s['unified_share'] * 100:.2f}% | {s['features_bytes'] / 2**20:.0f} MiB |")
    print("\n| video family | transformer | blocks, width | clip (frames × H × W) | latent grid | tokens | "
          "TFLOP / forward | sampling | extra forwards | PFLOP / clip | heads (seg, sal., depth), all latent frames | "
          "heads' share | unified head's share | features / clip (bf16) |")
    print("|---" * 14 + "|")
    for name, r in video.items():
        for clip, s in r["clips"].items():
            heads = ", ".join(f"{s['heads'][t] / 1e12:.1f}" for t in ("seg", "saliency", "depth"))
            print(f"| {name} | {r['params'] / 1e9:.2f} B | {r['blocks']}, {r['width']} | {clip} | "
                  f"{'×'.join(map(str, s['grid']))} | {s['tokens']:,} | {s['forward'] / 1e12:.0f} | {r['sampling']} | "
                  f"{s['extra_forwards']} | {s['generation'] / 1e15:.1f} | {heads} TFLOP | "
                  f"{s['heads_share'] * 100:.3f}% | {s['unified_share'] * 100:.3f}% | "
                  f"{s['features_bytes'] / 2**30:.1f} GiB |")
    res |= video
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
