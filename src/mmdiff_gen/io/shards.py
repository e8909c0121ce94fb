"""Shards on disk: one writer per shard, visible only when complete, with its stats file written last.

WebDataset: the tar is written to a hidden temporary file and renamed into place, so a reader (or a
resumed job) never sees a truncated tar, whatever moment the process dies. Files layout: every file
is written then renamed; a shard's samples count only once its stats file exists. Either way
`NNNNN_stats.json` is the shard's done marker (the img2dataset convention).
"""

from __future__ import annotations

import io
import json
import os
import socket
import tarfile
from pathlib import Path

FORMATS = ("webdataset", "files")
# files layout: member suffix → (folder, extension)
FILES_LAYOUT = {"jpg": ("images", "jpg"), "png": ("images", "png"), "json": ("meta", "json"),
                "txt": ("prompts", "txt"), "seg.png": ("seg", "png"), "sal.png": ("saliency", "png"),
                "depth.png": ("depth", "png"), "openseg.png": ("openseg", "png")}


def _tmp_tag() -> str:
    """Unique among workers sharing a file system (several nodes can have the same pid)."""
    return f"{socket.gethostname()}.{os.getpid()}"


def shard_name(shard: int) -> str:
    return f"{shard:05d}"


def stats_path(root: Path, shard: int) -> Path:
    return Path(root) / f"{shard_name(shard)}_stats.json"


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write to a hidden temporary name beside `path`, then rename: readers see the whole file or none."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{_tmp_tag()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to a unique temporary name, flush it to disk, then rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{_tmp_tag()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_stats(root: Path, shard: int, fingerprint: str | None = None) -> dict | None:
    """A finished shard's stats, or None if the shard is not finished (or, given `fingerprint`, was
    made from other inputs: such a shard is not part of this dataset)."""
    p = stats_path(root, shard)
    if not p.is_file():
        return None
    try:
        st = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # a damaged marker means: redo the shard
    if fingerprint is not None and st.get("fingerprint") != fingerprint:
        return None
    return st


class ShardWriter:
    """Writes one shard; `commit(stats)` publishes it, leaving by an exception discards it.

    Args:
        root: dataset folder.
        shard: shard number.
        fmt: "webdataset" (NNNNN.tar) or "files" (images/, seg/, saliency/, depth/, meta/, prompts/).
    """

    def __init__(self, root: Path, shard: int, fmt: str):
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        self.root, self.shard, self.fmt = Path(root), shard, fmt
        self.count = 0
        if fmt == "webdataset":
            self.path = self.root / f"{shard_name(shard)}.tar"
            self._tmp = self.root / f".{self.path.name}.{_tmp_tag()}.tmp"
            self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """One sample; members maps a suffix ("jpg", "seg.png", …) to its bytes. Members stay adjacent."""
        if not key.isdigit():
            raise ValueError(f"keys are digits only (a dot would split the sample), got {key!r}")
        if self.fmt == "webdataset":
            for suffix in sorted(members):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size, info.mtime, info.mode = len(members[suffix]), 0, 0o644  # fixed: byte-reproducible
                info.uname = info.gname = ""
                self._tar.addfile(info, io.BytesIO(members[suffix]))
        else:
            if self.count == 0:  # files are rewritten in place: the old done marker no longer holds
                stats_path(self.root, self.shard).unlink(missing_ok=True)
            for suffix, data in members.items():
                folder, ext = FILES_LAYOUT[suffix]
                (self.root / folder).mkdir(exist_ok=True)
                write_bytes_atomic(self.root / folder / f"{key}.{ext}", data)
        self.count += 1

    def commit(self, stats: dict) -> None:
        """Publish the shard: the tar by atomic rename, then its stats file (the done marker)."""
        if self.fmt == "webdataset":
            self._tar.close()
            with open(self._tmp, "rb+") as f:
                os.fsync(f.fileno())
            stats_path(self.root, self.shard).unlink(missing_ok=True)  # an older marker must not vouch for the new tar
            os.replace(self._tmp, self.path)
        write_json_atomic(stats_path(self.root, self.shard), stats)

    def abort(self) -> None:
        """Discard the unfinished shard; an older finished version of it (if any) stays as it was."""
        if self.fmt == "webdataset":
            try:
                self._tar.close()  # may fail again on a full disk
            except OSError:
                pass
            finally:
                self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is not None:
            self.abort()
