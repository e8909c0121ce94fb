"""Write N labelled toy-world scenes in the files layout (the layout `train` and `eval` read)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..io.files import FilesWriter
from .world import CLASSES, PALETTE, render_scene


def write_scenes(out: Path, n: int, seed: int = 0, on_sample: Callable[[], None] | None = None) -> int:
    """Render scenes seed, seed + 1, … seed + n − 1 to `out`; returns how many were written.

    Keys are the zero-padded scene seeds, so two runs with disjoint seed ranges never collide.
    """
    out = Path(out)
    writer = FilesWriter(out)
    (out / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (out / "palette.txt").write_text("\n".join(" ".join(map(str, c)) for c in PALETTE) + "\n")
    try:
        for s in range(seed, seed + n):
            scene = render_scene(s)
            writer.write(
                f"{s:09d}", image=scene.image, meta={"seed": s, **scene.meta()},
                labels={"seg": scene.seg, "saliency": scene.saliency, "depth": scene.depth},
            )
            if on_sample is not None:
                on_sample()
    finally:
        writer.close()
    return n
