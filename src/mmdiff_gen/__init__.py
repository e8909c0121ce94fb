"""mmdiff-gen: one diffusion-transformer pass yields an image and its dense annotations (MMDiff)."""

__version__ = "0.1.0"
