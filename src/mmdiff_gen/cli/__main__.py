"""`python -m mmdiff_gen.cli` (and `accelerate launch -m mmdiff_gen.cli train …`)."""

from . import main

main()
