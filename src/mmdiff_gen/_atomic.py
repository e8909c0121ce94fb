"""The one write-then-rename of the project: a file appears whole or not at all, whenever the process dies."""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

HOST = socket.gethostname()


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
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
