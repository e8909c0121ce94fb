"""Where a dataset lives: a local folder, or any URL fsspec reaches (s3://, gs://, …), behind one small API.

Everything that writes or reads a generated dataset (shards, done markers, claims, indexes, readers, `verify`)
goes through a `Store`, so a shared disk and an object store are one code path with two sets of guarantees:

- `LocalStore`: POSIX. A file is written to a hidden temporary beside it and renamed into place; claims are
  created with O_EXCL; index updates take an flock.
- `FsspecStore`: an object store has neither rename nor O_EXCL, but an object appears whole when its upload
  completes (a multipart upload too) and S3 / GCS create conditionally (`If-None-Match: *`, generation 0).
  Files are staged on the local disk (`staging_dir`) and uploaded whole; a claim is a conditional create.
  Credentials come from where the filesystem's own library looks (environment, profiles, instance roles).

Names are relative to the dataset's root, "/"-separated ("00000.tar", "images/000000001.jpg").
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import shutil
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import IO, Iterator, NamedTuple

from .._atomic import atomic_path, tmp_tag

LOCAL_SCHEME = "file://"


def is_remote(location: str | Path) -> bool:
    """Whether `location` is a URL of a filesystem other than the local one."""
    s = str(location)
    return "://" in s and not s.startswith(LOCAL_SCHEME)


def open_store(location: "str | Path | Store") -> "Store":
    """The store of a dataset location: a `Store` as is, a local path or file:// URL, else an fsspec URL."""
    if isinstance(location, Store):
        return location
    s = str(location)
    if not is_remote(s):
        return LocalStore(Path(s.removeprefix(LOCAL_SCHEME)))
    # The environment is part of the key (credentials and endpoints are read from it when a filesystem is built), and
    # so is the process: fsspec's async filesystems are not fork-safe (a DataLoader worker builds its own).
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(("AWS_", "GOOGLE_", "GCS", "FSSPEC_"))))
    return _fsspec_store(s.rstrip("/"), env, os.getpid())


@functools.lru_cache(maxsize=16)
def _fsspec_store(url: str, env: tuple, pid: int) -> "FsspecStore":
    """One store per URL (and credentials environment) per process: building a filesystem (an S3 client and its
    session) takes ≈ 0.1 s, paid per shard when each check built its own. Safe to share: no listing cache."""
    return FsspecStore(url)


class Stat(NamedTuple):
    """What a store says about a file without reading it."""

    size: int
    mtime: float  # Unix timestamp of the last write (an object's upload)
    version: str  # changes whenever the file is written again (mtime in ns; an object's ETag / generation)


class Store:
    """A dataset's root. Subclasses implement each operation with the guarantee the docstring states."""

    remote = False
    #: Whether `create` is atomic among processes on several hosts (O_EXCL; S3 / GCS conditional writes).
    atomic_create = True

    def url(self, name: str = "") -> str:
        """What a user (or another reader: webdataset, datasets) would open for `name`."""
        raise NotImplementedError

    def read_bytes(self, name: str) -> bytes:
        """The whole file; FileNotFoundError when it does not exist."""
        raise NotImplementedError

    def write_bytes(self, name: str, data: bytes, durable: bool = True) -> None:
        """`name` becomes `data` at once: a reader sees the old content, or the new, never a part."""
        raise NotImplementedError

    def create(self, name: str, data: bytes) -> bool:
        """Create `name` only if it does not exist (atomic among processes); False when it does."""
        raise NotImplementedError

    def stat(self, name: str) -> Stat | None:
        """Size, time and version of a file; None when absent."""
        raise NotImplementedError

    def names(self, pattern: str) -> list[str]:
        """Names in the root (not below) matching a glob pattern, sorted."""
        raise NotImplementedError

    def open(self, name: str) -> IO[bytes]:
        """A binary file object reading `name` from its start."""
        raise NotImplementedError

    def delete(self, name: str) -> None:
        """Remove `name` (a file, or a folder and what it holds); nothing when absent."""
        raise NotImplementedError

    def temp_path(self, name: str) -> Path:
        """A local path to write `name`'s next version to before `publish`, unique to this process."""
        raise NotImplementedError

    def publish(self, tmp: Path, name: str) -> None:
        """Make the finished local file `tmp` appear as `name`, whole (and remove `tmp`)."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Make the root exist (a folder), or check that it can (a bucket): one clear error otherwise."""
        raise NotImplementedError

    def lock(self, name: str):
        """A context in which no other process of this store holds the same lock, where the store offers
        locks (a local file system with flock); elsewhere a no-op."""
        return nullcontext()

    def exists(self, name: str) -> bool:
        return self.stat(name) is not None

    def __str__(self) -> str:
        return self.url()


class LocalStore(Store):
    """A folder on a (possibly shared) POSIX file system."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def url(self, name: str = "") -> str:
        return str(self.root / name) if name else str(self.root)

    def path(self, name: str) -> Path:
        return self.root / name

    def read_bytes(self, name: str) -> bytes:
        return self.path(name).read_bytes()

    def write_bytes(self, name: str, data: bytes, durable: bool = True) -> None:
        p = self.path(name)
        p.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(p, fsync=durable) as tmp:
            tmp.write_bytes(data)

    def create(self, name: str, data: bytes) -> bool:
        try:
            fd = os.open(self.path(name), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def stat(self, name: str) -> Stat | None:
        try:
            st = self.path(name).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return Stat(st.st_size, st.st_mtime, str(st.st_mtime_ns))

    def names(self, pattern: str) -> list[str]:
        return sorted(p.name for p in self.root.glob(pattern))

    def open(self, name: str) -> IO[bytes]:
        return open(self.path(name), "rb")

    def delete(self, name: str) -> None:
        p = self.path(name)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)

    def temp_path(self, name: str) -> Path:
        p = self.path(name)
        return p.with_name(f".{p.name}.{tmp_tag()}.tmp")  # beside it: the rename stays on one file system

    def publish(self, tmp: Path, name: str) -> None:
        os.replace(tmp, self.path(name))

    def prepare(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise NotADirectoryError(f"cannot create output folder {self.root}: a file is in the way") from None

    @contextmanager
    def lock(self, name: str) -> Iterator[None]:
        with open(self.path(name), "rb") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX)
            except OSError:
                pass  # no flock here (some Lustre mounts): the caller's result may be briefly stale
            yield


def staging_dir() -> Path:
    """Where shards bound for an object store are written before their upload (MMDIFF_STAGING, else the
    system's temporary folder): one shard at a time per process, a few hundred MB at most."""
    d = Path(os.environ.get("MMDIFF_STAGING") or Path(tempfile.gettempdir()) / "mmdiff-gen-staging")
    d.mkdir(parents=True, exist_ok=True)
    return d


class FsspecStore(Store):
    """A prefix on an object store (or any fsspec filesystem), e.g. s3://bucket/datasets/voc."""

    remote = True

    def __init__(self, url: str):
        try:
            import fsspec
        except ImportError as e:  # fsspec comes with datasets; an object store needs its own package too
            raise ImportError("writing to a URL needs fsspec and the filesystem's package: pip install "
                              "'mmdiff-gen[s3]' (or [gcs])") from e
        self._url = url.rstrip("/")
        try:
            # No listing cache: other processes write here; every question goes to the store.
            self.fs, self.root = fsspec.core.url_to_fs(self._url, use_listings_cache=False, skip_instance_cache=True)
        except ImportError as e:
            scheme = url.split("://", 1)[0]
            extra = {"s3": "s3", "gs": "gcs", "gcs": "gcs"}.get(scheme)
            raise ImportError(f"{url}: no filesystem for {scheme}:// installed"
                              + (f"; pip install 'mmdiff-gen[{extra}]'" if extra else f" ({e})")) from None
        except ValueError as e:
            raise ValueError(f"{url}: {e}") from None
        self.scheme = url.split("://", 1)[0]
        # fsspec's generic create checks, then writes (a race); S3 and GCS honour a precondition on the upload.
        # An S3-compatible store must honour If-None-Match too (AWS, recent MinIO and R2 do).
        self.atomic_create = self.scheme in ("s3", "s3a", "gs", "gcs")

    def __reduce__(self):  # Ray and process pools pass stores by URL: the filesystem is rebuilt there
        return (FsspecStore, (self._url,))

    def url(self, name: str = "") -> str:
        return f"{self._url}/{name}" if name else self._url

    def _p(self, name: str) -> str:
        return f"{self.root}/{name}"

    def read_bytes(self, name: str) -> bytes:
        return self.fs.cat_file(self._p(name))

    def write_bytes(self, name: str, data: bytes, durable: bool = True) -> None:
        self.fs.pipe_file(self._p(name), data)  # one PUT: the object appears whole when it completes

    def create(self, name: str, data: bytes) -> bool:
        try:
            self.fs.pipe_file(self._p(name), data, mode="create")  # S3 If-None-Match: *, GCS generation 0
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno == errno.EEXIST or "PreconditionFailed" in str(e) or "412" in str(e):
                return False
            raise
        except TypeError:
            raise NotImplementedError(f"{self.scheme}:// offers no conditional create: several processes "
                                      "cannot share it safely; use --engine ray") from None
        return True

    def stat(self, name: str) -> Stat | None:
        try:
            info = self.fs.info(self._p(name))
        except FileNotFoundError:
            return None
        if info.get("type") == "directory":
            return None
        modified = info.get("LastModified") or info.get("updated") or info.get("mtime")
        if hasattr(modified, "timestamp"):
            mtime = modified.timestamp()
        elif isinstance(modified, str):
            from datetime import datetime

            mtime = datetime.fromisoformat(modified.replace("Z", "+00:00")).timestamp()
        else:
            mtime = float(modified or 0.0)
        version = info.get("ETag") or info.get("generation") or info.get("etag") or repr(mtime)
        return Stat(int(info["size"]), mtime, str(version).strip('"'))

    def names(self, pattern: str) -> list[str]:
        return sorted(p.rsplit("/", 1)[-1] for p in self.fs.glob(self._p(pattern)))

    def open(self, name: str) -> IO[bytes]:
        return self.fs.open(self._p(name), "rb", block_size=8 << 20)

    def delete(self, name: str) -> None:
        p = self._p(name)
        try:
            if self.fs.isdir(p):
                self.fs.rm(p, recursive=True)
            else:
                self.fs.rm_file(p)
        except FileNotFoundError:
            pass

    def temp_path(self, name: str) -> Path:
        return staging_dir() / f".{name.replace('/', '_')}.{tmp_tag()}.tmp"

    def publish(self, tmp: Path, name: str) -> None:
        self.fs.put_file(str(tmp), self._p(name))  # multipart for large files: visible only once complete
        tmp.unlink(missing_ok=True)

    def prepare(self) -> None:
        bucket = self.root.split("/", 1)[0]
        if self.scheme in ("s3", "s3a", "gs", "gcs"):
            try:
                ok = self.fs.exists(bucket)
            except (PermissionError, OSError) as e:
                raise PermissionError(f"{self._url}: cannot reach the bucket {bucket}: {e}") from None
            if not ok:
                raise FileNotFoundError(f"{self._url}: the bucket {bucket} does not exist (or these credentials "
                                        "cannot see it)")
        else:
            self.fs.makedirs(self.root, exist_ok=True)
