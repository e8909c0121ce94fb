"""Writers and readers of what mmdiff-gen produces."""
