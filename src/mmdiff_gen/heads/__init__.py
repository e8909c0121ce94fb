"""Trainable heads: token aggregation over timesteps, DeepLabV3+ and DPT decoders (tensors in, tensors out)."""
