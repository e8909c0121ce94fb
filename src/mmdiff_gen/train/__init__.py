"""Training and evaluation of heads: feature cache, loop, metrics."""
