"""The caption job: one JSONL line `{"key", "caption"}` per image of a dataset — what `--captions` reads.

Resumable line by line: a batch's lines are appended and fsynced together, so a killed run loses at most the
batch in flight, and a re-run captions only the batches with a key missing (a line torn by the kill is dropped
first). A batch is the unit of work and of resume, as a shard is elsewhere: the batches are fixed slices of the
dataset's order and a re-run captions a batch whole, so every image is captioned in the company it would have had
in one uninterrupted run (batched kernels and padding are not bit-identical across batch compositions).
Worker r of W captions the batches b ≡ r (mod W) into its own part file beside the output; worker 0 waits for
every key and assembles the output in dataset order; one worker appends to the output itself. A sidecar
(`OUT.json`) records the captioner (model, weights, prompt, length): captions of two captioners are never mixed.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from .._atomic import atomic_path, tmp_tag
from .._workers import STALL_S, owned_shards, shard_ranges, wait_for
from ._progress import JobProgress


class Captioner(Protocol):
    """What the job needs of a captioner (backbones.captioner.Captioner, toy.captioner.OracleCaptioner)."""

    def identity(self) -> dict: ...

    def __call__(self, images: Sequence[np.ndarray]) -> list[str]: ...


@dataclass(frozen=True)
class CaptionerChoice:
    """A captioner named but not loaded yet: `identity()` is what its captions file will record (read without
    loading it: an `--out` of another captioner is refused first), `load()` places it (a VLM: gigabytes)."""

    identity: Callable[[], dict]
    load: Callable[[], Captioner]


@dataclass(frozen=True)
class CaptionRun:
    """What one worker did: `written` captions it wrote now, of `owned` images in its batches (`total` in the
    dataset); `assembled`: whether it wrote the output whole (worker 0 or a single worker)."""

    total: int
    owned: int
    written: int
    rank: int
    world_size: int
    assembled: bool


def sidecar_path(out: Path) -> Path:
    """`caps.jsonl` → `caps.jsonl.json`: which captioner wrote it (its own file: `--captions` reads every line)."""
    return Path(out).with_name(Path(out).name + ".json")


def part_path(out: Path, rank: int, world_size: int) -> Path:
    """Where worker `rank` of `world_size` appends its captions before worker 0 assembles `out`."""
    return Path(out).with_name(f"{Path(out).name}.part{rank}-of-{world_size}")


def _part_files(out: Path) -> list[Path]:
    """Every part file beside `out`, of any number of workers (a re-run with another W reads earlier parts)."""
    pattern = re.compile(re.escape(out.name) + r"\.part\d+-of-\d+")
    return sorted(p for p in out.parent.glob(out.name + ".part*") if pattern.fullmatch(p.name) and p.is_file())


def _row(line: bytes) -> tuple[str, str] | None:
    """One line → (key, caption), or None when it is not a whole `{"key", "caption"}` object."""
    try:
        row = json.loads(line)
        return (row["key"], row["caption"]) if isinstance(row["key"], str) and isinstance(row["caption"], str) else None
    except (ValueError, KeyError, TypeError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None


def _scan(path: Path, strict: bool = True) -> tuple[list[tuple[str, str]], int, bool]:
    """A captions file → (its rows, bytes that hold them, whether its last row lacks its newline).

    Lines end in a newline; a last line without one was torn by a kill unless it is a whole row (a prefix of a
    JSON object never parses), and its bytes are not counted. `strict`: a bad line before the last is a
    ValueError (the file was damaged or edited); otherwise reading stops there (another worker's part, read while
    it may be writing: only its own batches' keys are in it).
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 0, False
    rows, start, n = [], 0, 0
    while start < len(data):
        end, n = data.find(b"\n", start), n + 1
        line = data[start:] if end < 0 else data[start:end]
        row = _row(line) if line.strip() else None
        if end < 0:  # the last line, without its newline
            return (rows + [row], len(data), True) if row else (rows, start, False)
        if row is None and line.strip():
            if strict:
                raise ValueError(f"{path}:{n}: not a {{\"key\", \"caption\"}} JSON line; repair or delete the file")
            return rows, start, False
        if row is not None:
            rows.append(row)
        start = end + 1
    return rows, len(data), False


def _present(out: Path, strict_parts: Sequence[Path] = ()) -> dict[str, str]:
    """{key: caption} of `out` and every part file (the first line of a key wins, as a re-run skips it)."""
    found: dict[str, str] = {}
    for path in [out, *_part_files(out)]:
        for key, caption in _scan(path, strict=path == out or path in strict_parts)[0]:
            found.setdefault(key, caption)
    return found


def captioned(out: Path, keys: Sequence[str]) -> int:
    """How many of `keys` have a line in the captions file `out` (part files not counted: `out` is what `--captions`
    reads, and it holds every key once worker 0 has assembled it)."""
    found = {k for k, _ in _scan(Path(out), strict=False)[0]}
    return sum(k in found for k in keys)


def check_output(out: Path, identity: dict, claim: bool = False) -> None:
    """Whether the captioner `identity` may write `out`: ValueError, in one line, for an `out` recorded as another
    captioner's, or holding lines without a record (written by something else). Cheap: the CLI asks before a
    model loads. With `claim` (the job, before its first line), an `out` without a record becomes this
    captioner's: the first worker to write the sidecar wins (an exclusive link), the others compare."""
    out, side = Path(out), sidecar_path(out)
    if out.is_dir():
        raise ValueError(f"{out} is a folder; give the JSONL file to write")
    written = any(p.is_file() and p.stat().st_size for p in [out, *_part_files(out)])
    if not side.exists():
        if written:
            raise ValueError(f"{out} holds lines that no `mmdiff-gen caption` run recorded (no {side.name}): "
                             "give another --out, or delete it")
        if not claim:
            return
        tmp = side.with_name(f".{side.name}.{tmp_tag()}.tmp")
        try:
            tmp.write_text(json.dumps({"captioner": identity, "written_by": "mmdiff-gen caption"}, indent=1) + "\n")
            os.link(tmp, side)  # fails if another worker's sidecar is already there
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    try:
        recorded = json.loads(side.read_text())["captioner"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"{side}: not a caption run's record; delete it and {out.name}, or give another --out") \
            from None
    if recorded != identity:
        differ = ", ".join(k for k in sorted(set(recorded) | set(identity)) if recorded.get(k) != identity.get(k))
        what = "captions" if written else f"no caption yet (delete {side.name} to start over)"
        raise ValueError(f"{out} is another captioner's (its {differ} differ; see {side.name}), holding {what}: "
                         "captions of two captioners are never mixed in one file — give another --out")


def _open_for_append(path: Path, strict: bool = True):
    """Open a captions file this worker owns for appending, after dropping a torn last line (its image is
    captioned again) or completing a whole last row that lost its newline."""
    _, keep, newline = _scan(path, strict=strict)
    f = open(path, "ab")
    if f.tell() > keep:
        f.truncate(keep)
    if newline:
        f.write(b"\n")
    f.flush()
    os.fsync(f.fileno())
    return f


def _lines(rows: Sequence[tuple[str, str]]) -> bytes:
    # ensure_ascii: every byte is ASCII, so no caption character splits a line for a reader that splits on
    # Unicode line breaks (str.splitlines breaks at U+2028) and a torn write never leaves half a character.
    return "".join(json.dumps({"key": k, "caption": c}) + "\n" for k, c in rows).encode()


def assemble(out: Path, keys: Sequence[str]) -> bool:
    """Write `out` whole (atomically) from itself and the part files, one line per key, then delete the parts.

    One file may caption several datasets or splits: lines of other keys keep their order and place (those
    before the first line of `keys` stay before), and the lines of `keys` follow `keys` order. RuntimeError if a
    key has no caption. Returns whether `out` changed (a finished file is left as it is).
    """
    out = Path(out)
    parts = _part_files(out)
    found = _present(out, strict_parts=parts)  # out's keys first, in its order, then the parts'
    missing = [k for k in keys if k not in found]
    if missing:
        raise RuntimeError(f"{len(missing)} image(s) of {len(keys)} have no caption yet (first: {missing[0]}): "
                           "re-run every worker")
    mine = set(keys)
    first = next((i for i, k in enumerate(found) if k in mine), len(found))
    others = [k for k in found if k not in mine]
    order = others[:first] + list(dict.fromkeys(keys)) + others[first:]
    text = _lines([(k, found[k]) for k in order])
    changed = not out.is_file() or out.read_bytes() != text
    if changed:
        with atomic_path(out) as tmp:
            tmp.write_bytes(text)
    for p in parts:
        p.unlink(missing_ok=True)
    return changed


def caption_dataset(captioner: Captioner, dataset, out: Path, *, batch_size: int = 16, rank: int = 0,
                    world_size: int = 1, wait: bool = True, progress: bool = False, stall_s: float = STALL_S,
                    poll_s: float = 2.0) -> CaptionRun:
    """Caption every image of `dataset` into the JSONL file `out` (resumable; see the module docstring).

    Args:
        captioner: images (H, W, 3) uint8 → one caption each; its `identity()` is recorded beside `out`.
        dataset: a reader (`io.datasets.open_dataset`): keys, len, indexing → Sample.
        out: the JSONL file (its parent folder must exist).
        batch_size: images per captioner call; the batches are fixed slices of the dataset's order.
        rank, world_size: this worker captions batches b ≡ rank (mod world_size).
        wait: worker 0 of several waits for the others' parts and assembles `out` (False: it returns after its
            own batches, like the others).
        progress: show a progress bar (or periodic lines in a log).
        stall_s, poll_s: how worker 0 waits (`_workers.wait_for`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"worker rank {rank} is not in 0…{world_size - 1}")
    out, keys = Path(out), list(dataset.keys)
    if not keys:
        raise ValueError("the dataset has no images")
    check_output(out, captioner.identity(), claim=True)
    target = out if world_size == 1 else part_path(out, rank, world_size)
    slices = shard_ranges(len(keys), batch_size)
    batches = [slices[s] for s in owned_shards(len(slices), rank, world_size)]
    present = _present(out, strict_parts=[target])
    todo = [b for b in batches if any(keys[i] not in present for i in b)]
    written = 0
    if todo:
        bar = JobProgress(sum(len(b) for b in todo), label="caption" if world_size == 1 else
                          f"caption {rank}/{world_size}", enabled=progress)
        try:
            with _open_for_append(target) as f:
                for batch in todo:
                    captions = captioner([dataset[i].image for i in batch])
                    if len(captions) != len(batch):
                        raise RuntimeError(f"the captioner returned {len(captions)} captions for {len(batch)} images")
                    new = {keys[i]: c for i, c in zip(batch, captions) if keys[i] not in present}
                    present.update(new)
                    rows = list(new.items())
                    f.write(_lines(rows))
                    f.flush()
                    os.fsync(f.fileno())  # this batch survives a kill from here on
                    written += len(rows)
                    bar.advance(len(batch))
        finally:
            bar.close()
    run = dict(total=len(keys), owned=sum(len(b) for b in batches), written=written, rank=rank,
               world_size=world_size)
    if world_size > 1 and (rank != 0 or not wait):
        return CaptionRun(**run, assembled=False)
    if world_size > 1:
        def done() -> int:
            found = _present(out)  # every part read leniently: their workers may be writing
            return sum(k in found for k in keys)

        wait_for(done, len(keys), "captioned images", stall_s=stall_s, poll_s=poll_s)
    assemble(out, keys)
    return CaptionRun(**run, assembled=True)
