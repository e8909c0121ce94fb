"""The one write-then-rename of the project: a file appears whole or not at all, whenever the process dies."""

from __future__ import annotations

import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

HOST = socket.gethostname()


def _umask() -> int:
    mask = os.umask(0)  # reading it means setting it: put it straight back (once, at import)
    os.umask(mask)
    return mask


# Files get the permissions the user's umask gives a new file (0644 under 022), whatever created them: safetensors
# writes 0600, which would keep colleagues on a shared cluster from reading heads and caches.
FILE_MODE = 0o666 & ~_umask()


def tmp_tag() -> str:
    """Unique among workers sharing a file system (several nodes can have the same pid)."""
    return f"{HOST}.{os.getpid()}"


@contextmanager
def atomic_path(path: Path, fsync: bool = True) -> Iterator[Path]:
    """The one write-then-rename of the project: yields a hidden temporary path beside `path`
    (`.NAME.HOST.PID.tmp`, unique among workers sharing a file system) to write; when the block ends it is
    flushed to disk (`fsync`) and renamed over `path`, so readers see the whole file or none; if the block
    raises, it is deleted."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{tmp_tag()}.tmp")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def folder_in_use(path: Path) -> bool:
    """Whether `path` is a file, or a folder holding anything."""
    path = Path(path)
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


@contextmanager
def atomic_folder(path: Path, overwrite: bool = False) -> Iterator[Path]:
    """A folder that appears whole: yields a hidden temporary folder beside `path` (`.NAME.HOST.PID.tmp`) to fill;
    when the block ends it takes `path`'s place, an existing one moved aside first and then deleted; if the block
    raises, it is deleted and `path` is as it was. A `path` that holds anything is refused (FileExistsError, before
    the block runs) unless `overwrite`."""
    path = Path(path)
    if folder_in_use(path) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty: choose another folder, or overwrite it")
    tmp = path.with_name(f".{path.name}.{tmp_tag()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        old = path.with_name(f".{path.name}.replaced-{tmp_tag()}") if path.exists() else None
        if old is not None:
            os.rename(path, old)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()
