"""Shards in a store (io.store: a folder, or a prefix on an object store): one writer per shard, visible only
when complete, with its stats file written last.

WebDataset: the tar is written to a temporary file (hidden beside it on a file system, on the local disk for
an object store) and renamed or uploaded into place, so a reader (or a resumed job) never sees a truncated tar,
whatever moment the process dies. Files layout: every file is written whole; a shard's samples count only once
its stats file exists. Either way `NNNNN_stats.json` is the shard's done marker (the img2dataset convention); it
records the byte size and sha256 of every file of the shard, so a damaged or replaced file is caught.

Several processes may work on one dataset (a duplicated rank, overlapping SLURM steps, plain processes on one
bucket): a shard is written only by the holder of its claim (`.NNNNN.claim`, created exclusively: O_EXCL, or a
conditional create on S3 / GCS; a dead holder's claim is taken over), and each process deletes only its own
temporary files or those of dead processes.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import queue
import re
import shutil
import tarfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from .._atomic import HOST as _HOST
from .._atomic import atomic_path
from .._atomic import tmp_tag as _tmp_tag
from ..tasks import TASKS
from .store import LocalStore, Store, open_store, staging_dir

DATASET_FILE = "dataset.json"
SIZES_FILE = "sizes.json"  # {shard file: samples}, what open_clip-style loaders read
WIDS_INDEX = "shardindex.json"  # wids' index (wids_version, shardlist of url + nsamples), wids' default name
FORMATS = ("webdataset", "files")


def files_layout() -> dict[str, tuple[str, str]]:
    """The `--format files` layout: member suffix → (folder, extension); each task's label PNGs (a clip's npz) in its
    folder."""
    return {"jpg": ("images", "jpg"), "png": ("images", "png"), "mp4": ("videos", "mp4"), "json": ("meta", "json"),
            "txt": ("prompts", "txt"), **{t.member: (t.folder, "png") for t in TASKS.values()},
            **{t.video_member: (t.folder, "npz") for t in TASKS.values()}}
# A claim whose holder stopped refreshing it this long ago is taken over (holders refresh it every batch).
CLAIM_TIMEOUT_S = 3600.0


def shard_name(shard: int) -> str:
    return f"{shard:05d}"


def stats_name(shard: int) -> str:
    return f"{shard_name(shard)}_stats.json"


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """`data` to `path` by write-then-rename (no fsync: for the many small member files of the files
    layout, whose shard's done marker is fsynced after them)."""
    with atomic_path(path, fsync=False) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: Path, obj) -> None:
    """JSON to `path` by write-then-rename, on disk before the rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False), encoding="utf-8")


def write_json(store: Store, name: str, obj) -> None:
    """JSON to `name` in a store, whole or not at all (durable before it is visible)."""
    store.write_bytes(name, json.dumps(obj, indent=1, ensure_ascii=False).encode("utf-8"))


def read_json(store: Store, name: str) -> dict | None:
    """A JSON file of a store; None when absent, {} when unreadable (made by nobody we know)."""
    try:
        return json.loads(store.read_bytes(name))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def read_stats(root: "Path | str | Store", shard: int, fingerprint: str | None = None) -> dict | None:
    """A finished shard's stats, or None if the shard is not finished (or, given `fingerprint`, was
    made from other inputs: such a shard is not part of this dataset)."""
    st = read_json(open_store(root), stats_name(shard))
    if not st:
        return None  # absent, or a damaged marker: redo the shard
    if fingerprint is not None and st.get("fingerprint") != fingerprint:
        return None
    return st


def file_digest(store: Store, name: str) -> tuple[int, str]:
    """(bytes, sha256 hex) of a file of a store, read in 1 MiB blocks."""
    h, n = hashlib.sha256(), 0
    with store.open(name) as f:
        while block := f.read(1 << 20):
            h.update(block)
            n += len(block)
    return n, h.hexdigest()


def shard_problem(root: "Path | str | Store", stats: dict, full: bool = False) -> str | None:
    """Why a finished shard's files do not match its done marker (None: they do).

    Sizes are always checked (cheap: what a resumed job and every reader do); `full` also checks the
    sha256 of every byte (`mmdiff-gen verify`). A marker without file records predates them: not checked.
    """
    store = open_store(root)
    for rel, want in stats.get("files", {}).items():
        found = store.stat(rel)
        if found is None:
            return f"{rel} is missing"
        if found[0] != want["bytes"]:
            return f"{rel} has {found[0]} bytes, its done marker says {want['bytes']}"
        if full and file_digest(store, rel)[1] != want["sha256"]:
            return f"{rel}: sha256 differs from its done marker"
    return None


def changed_files(root: "Path | str | Store", stats: dict) -> list[str]:
    """The files of a finished shard written again since its done marker recorded them: their version (mtime in
    ns; an object's ETag / generation) differs. A copy of the dataset changes them too, so a change says where to
    look (`file_digest`), not that a file is damaged. Markers without versions: none."""
    store = open_store(root)
    changed = []
    for rel, want in stats.get("files", {}).items():
        found = store.stat(rel)
        if "version" in want and found is not None and found.version != want["version"]:
            changed.append(rel)
    return changed


class _HashingFile(io.RawIOBase):
    """A write-only file that hashes what goes through it: the tar's sha256 without reading it back."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)

    def tell(self) -> int:
        return self.size


class ShardWriter:
    """Writes one shard; `commit(stats)` publishes it, leaving by an exception discards it.

    Args:
        root: dataset folder, URL or store.
        shard: shard number.
        fmt: "webdataset" (NNNNN.tar) or "files" (images/, seg/, saliency/, depth/, meta/, prompts/).
    """

    def __init__(self, root: "Path | str | Store", shard: int, fmt: str):
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        self.store, self.shard, self.fmt = open_store(root), shard, fmt
        self.count = 0
        self.files: dict[str, dict] = {}  # path relative to root → {"bytes", "sha256"}: the done marker's record
        if fmt == "webdataset":
            self.name = f"{shard_name(shard)}.tar"
            self._tmp = self.store.temp_path(self.name)
            self._file = open(self._tmp, "wb")
            self._hashed = _HashingFile(self._file)
            self._tar = tarfile.open(fileobj=self._hashed, mode="w", format=tarfile.USTAR_FORMAT)

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
                self.store.delete(stats_name(self.shard))
            for suffix, data in members.items():
                folder, ext = files_layout()[suffix]
                rel = f"{folder}/{key}.{ext}"
                self.store.write_bytes(rel, data, durable=False)  # the marker, written after them, is durable
                self.files[rel] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                                   "version": self.store.stat(rel).version}
        self.count += 1

    def commit(self, stats: dict) -> None:
        """Publish the shard: the tar by atomic rename (or a whole upload), then its stats file (the done
        marker) with the size and sha256 of every file it vouches for. A shard without samples (all filtered)
        publishes no tar, only its marker: an empty tar breaks readers that infer a schema from the first shard
        (HF datasets)."""
        marker = stats_name(self.shard)
        if self.fmt == "webdataset" and self.count == 0:
            self.abort()
            self.store.delete(marker)  # then an older version's tar, if any
            self.store.delete(self.name)
        elif self.fmt == "webdataset":
            self._tar.close()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self.files = {self.name: {"bytes": self._hashed.size, "sha256": self._hashed.sha.hexdigest()}}
            self.store.delete(marker)  # an older marker must not vouch for the new tar
            self.store.publish(self._tmp, self.name)
            self.files[self.name]["version"] = self.store.stat(self.name).version
        write_json(self.store, marker, {**stats, "files": self.files})

    def abort(self) -> None:
        """Discard the unfinished shard; an older finished version of it (if any) stays as it was."""
        if self.fmt == "webdataset":
            try:
                self._file.close()  # the tar's trailer is not needed: the file is deleted
            except OSError:
                pass  # a full disk may fail the flush again
            finally:
                self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is not None:
            self.abort()


class PipelinedWriter:
    """Encodes samples on a small thread pool and writes them in order, so a job's next batch generates
    while this one is encoded and written.

    `put` hands over one sample (raw arrays; `encode` makes its member bytes) and returns at once unless
    `max_pending` samples are still waiting (back-pressure: memory stays bounded). Samples reach the
    shard in the order they were put; one whose encoding fails is left out and reported to its
    `on_error` (the others go on); an OSError while writing (a full disk) is raised in the caller at
    its next `put` or at `finish`. Leaving by an exception drops what is pending and aborts the shard.
    Threads suffice: PIL's encoders and zlib release the GIL.

    Args:
        writer: the shard being written.
        encode: sample → {member suffix: bytes}.
        workers: encoding threads; 0 encodes and writes in the caller (the reference path).
        max_pending: samples put but not yet written.
    """

    def __init__(self, writer: ShardWriter, encode: Callable[[Any], dict[str, bytes]], workers: int = 2,
                 max_pending: int = 16):
        self.writer, self.encode, self.workers = writer, encode, workers
        self.waited = 0.0  # seconds the caller spent blocked on the writer (the generator's idle time)
        self._error: BaseException | None = None
        if workers:
            self._pool = ThreadPoolExecutor(workers, thread_name_prefix="encode")
            self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
            self._thread = threading.Thread(target=self._drain, name="shard-writer", daemon=True)
            self._thread.start()

    def put(self, key: str, sample: Any, on_error: Callable[[str], None]) -> None:
        self._raise()
        t0 = time.perf_counter()
        if self.workers:
            self._queue.put((key, self._pool.submit(self._encode, sample, on_error)))
        else:
            self._write_one(key, self._encode(sample, on_error))
        self.waited += time.perf_counter() - t0

    def finish(self) -> None:
        """Wait until every sample put is written; the shard can then be committed."""
        if self.workers:
            t0 = time.perf_counter()
            self._queue.put(None)
            self._thread.join()
            self._pool.shutdown()
            self.waited += time.perf_counter() - t0
        self._raise()

    def _encode(self, sample: Any, on_error: Callable[[str], None]) -> dict[str, bytes] | None:
        try:
            return self.encode(sample)
        except Exception as e:  # noqa: BLE001 — one sample's bad label map must not lose the shard
            on_error(f"{type(e).__name__} while encoding: {e}")
            return None

    def _write_one(self, key: str, members: dict[str, bytes] | None) -> None:
        if members is not None:
            self.writer.write(key, members)

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            key, future = item
            if self._error is None:
                try:
                    self._write_one(key, future.result())
                except BaseException as e:  # noqa: BLE001 — handed to the caller's thread
                    self._error = e

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def __enter__(self) -> "PipelinedWriter":
        return self

    def __exit__(self, exc_type, *_):
        if not self.workers or not self._thread.is_alive():
            return
        if exc_type is not None:
            self._error = self._error or RuntimeError("aborted")  # the drain thread stops writing
        while True:  # unblock and stop the drain thread, dropping what is pending
            try:
                self._queue.put_nowait(None)
                break
            except queue.Full:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    pass
        self._thread.join()
        self._pool.shutdown(cancel_futures=True)


# --- several processes on one folder ------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False  # not a process id (kill(0 or -1) would address process groups)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _holder_gone(host: str, pid: int, age_s: float) -> bool:
    """A process on this host is checked directly; one elsewhere, by how long its claim went unrefreshed."""
    if host == _HOST and not _pid_alive(pid):
        return True
    return age_s > CLAIM_TIMEOUT_S  # also on this host: a recycled pid must not hold a shard forever


class ShardClaim:
    """The right to write one shard: `.NNNNN.claim` in the dataset's store, created exclusively.

    A claim held by a dead process (same host: its pid is gone; another host: not refreshed for
    CLAIM_TIMEOUT_S) is taken over. Two processes that take over the same stale claim at once both
    believe they hold it for a moment; `held()` (checked before every batch and before the commit)
    sees which one the file names, and the other abandons the shard. `token` names the claim: a scheduler
    that hands a shard to a worker (the Ray engine) chooses it, so that it can `break_claim` a dead worker's.
    """

    def __init__(self, root: "Path | str | Store", shard: int, token: str | None = None):
        self.store = open_store(root)
        self.name = claim_name(shard)
        self.shard = shard
        self.token = token or uuid.uuid4().hex
        self.took_over = False

    def _record(self) -> bytes:
        return json.dumps({"host": _HOST, "pid": os.getpid(), "token": self.token, "since": time.time()}).encode()

    def acquire(self) -> bool:
        """Take the claim; False when a live process holds it."""
        if self.store.create(self.name, self._record()):
            return True
        if not self._stale():
            return False
        self.store.write_bytes(self.name, self._record(), durable=False)  # take over: replace the dead holder's
        self.took_over = True
        return self.held()

    def _stale(self) -> bool:
        found = self.store.stat(self.name)
        if found is None:
            return True
        age = time.time() - found[1]
        try:
            rec = json.loads(self.store.read_bytes(self.name))
        except FileNotFoundError:
            return True
        except (OSError, ValueError):  # being written right now, or garbage: judge by age alone
            return age > CLAIM_TIMEOUT_S
        return _holder_gone(rec.get("host", ""), int(rec.get("pid", -1)), age)

    def held(self) -> bool:
        """Whether the claim file still names this claim (and refresh it: holders prove they are alive)."""
        try:
            if json.loads(self.store.read_bytes(self.name)).get("token") != self.token:
                return False
            if isinstance(self.store, LocalStore):
                os.utime(self.store.path(self.name))
            else:  # an object's time is its last upload
                self.store.write_bytes(self.name, self._record(), durable=False)
            return True
        except (OSError, ValueError):
            return False

    def release(self) -> None:
        if self.held():
            self.store.delete(self.name)


def claim_name(shard: int) -> str:
    return f".{shard_name(shard)}.claim"


def break_claim(root: "Path | str | Store", shard: int, token: str) -> None:
    """Delete a shard's claim if it still names `token`: its holder is known to be dead (a scheduler saw its
    worker die), so the shard need not wait CLAIM_TIMEOUT_S for another host to take it over."""
    store = open_store(root)
    try:
        if json.loads(store.read_bytes(claim_name(shard))).get("token") == token:
            store.delete(claim_name(shard))
    except (OSError, ValueError):
        pass


def _tagged_by_dead_process(name: str, before: str = ".") -> bool:
    """Whether `name` ends in `{before}HOST.PID` (`tmp_tag`'s form) naming a process of this host that is
    gone. Another node's processes cannot be judged here: their files are left alone."""
    tail = f"{before}{_HOST}."
    i = name.rfind(tail)
    pid = name[i + len(tail) :] if i >= 0 else ""
    return pid.isdigit() and not _pid_alive(int(pid))


def remove_dead_temporaries(root: "Path | str | Store") -> None:
    """Delete the hidden temporary files (`.NAME.HOST.PID.tmp`) of this host's dead processes (beside the
    dataset's files, or in the staging folder of an object store); readers never look at temporaries, so
    another node's stay until a run there removes them."""
    store = open_store(root)
    folder = store.root if isinstance(store, LocalStore) else staging_dir()
    for p in Path(folder).glob(".*.tmp"):
        if _tagged_by_dead_process(p.name[: -len(".tmp")]):
            p.unlink(missing_ok=True)


def remove_shard_temporaries(root: "Path | str | Store", shard: int) -> None:
    """Delete every temporary of one shard but this process's: called by the holder of its claim, so
    any other writer of that shard is gone. (An object store's are on each writer's own disk.)"""
    store = open_store(root)
    if not isinstance(store, LocalStore):
        return
    mine = f".{_tmp_tag()}.tmp"
    for pattern in (f".{shard_name(shard)}.tar.*.tmp", f".{shard_name(shard)}_stats.json.*.tmp"):
        for p in store.root.glob(pattern):
            if not p.name.endswith(mine):
                p.unlink(missing_ok=True)


# --- replacing a dataset (--overwrite) --------------------------------------------------------------
_OURS = re.compile(r"\d{5,}(\.tar|_stats\.json)|\..*\.(tmp|claim)")
_REPLACED = ".replaced-"


def is_dataset_file(name: str) -> bool:
    """Whether a name in a dataset folder is one of ours (anything else, a log or a note, is the user's)."""
    folders = {folder for folder, _ in files_layout().values()}
    return name in (DATASET_FILE, SIZES_FILE, WIDS_INDEX) or name in folders or bool(_OURS.fullmatch(name))


def _move_back(root: Path, old: Path) -> None:
    """Move the user's files of a renamed-away dataset folder back into `root`."""
    for p in old.iterdir():
        if not is_dataset_file(p.name) and not (root / p.name).exists():
            os.replace(p, root / p.name)


def recover_replacements(root: "Path | str | Store") -> None:
    """Finish the replacements of `root` that a dead process left half done (see `clear_dataset`)."""
    store = open_store(root)
    if not isinstance(store, LocalStore):
        return  # an object store's dataset is cleared in place, never renamed away
    root = store.root
    for old in root.parent.glob(f".{root.name}{_REPLACED}*"):
        if _tagged_by_dead_process(old.name, before="-"):  # `.DIR.replaced-HOST.PID`
            root.mkdir(exist_ok=True)  # it died between renaming the folder away and making the new one
            _move_back(root, old)
            shutil.rmtree(old, ignore_errors=True)


def clear_dataset(root: "Path | str | Store") -> Path | None:
    """Remove a dataset's files so that no moment shows a mix of it and the dataset that replaces it.

    The folder is renamed away in one step (so `root/*.tar` goes from the old shards, all of them, to
    none), a fresh folder takes its name and the user's own files (anything `is_dataset_file` does not
    claim) are moved back. Returns the renamed-away folder, invisible under `root` already: the caller
    deletes it once the new dataset.json is written (deleting terabytes on a network file system takes
    long, and other workers wait for that file). A process killed in between leaves
    `.NAME.replaced-HOST.PID` beside the folder; the next run on that host finishes the job
    (`recover_replacements`). Where the folder cannot be renamed (a mount point, a read-only parent),
    files are deleted one by one, done markers and indexes first, so our readers never take a lone old tar
    for part of the new dataset; None is returned. An object store has no rename: it is always cleared so.
    """
    store = open_store(root)
    if isinstance(store, LocalStore):
        root = store.root
        old = root.parent / f".{root.name}{_REPLACED}{_tmp_tag()}"
        try:
            os.rename(root, old)
        except OSError as e:
            if e.errno not in (errno.EBUSY, errno.EACCES, errno.EPERM, errno.EXDEV, errno.EROFS, errno.EINVAL):
                raise
        else:
            root.mkdir(exist_ok=True)
            _move_back(root, old)
            return old
    names = sorted((n for n in store.names("*") + store.names(".*") if is_dataset_file(n)),
                   key=lambda n: (n != DATASET_FILE, not n.endswith(".json"), n))
    for n in dict.fromkeys(names):
        store.delete(n)
    return None


def write_indexes(root: "Path | str | Store", finished: Callable[[], dict[str, tuple[int, int]]], wids: bool = True) -> None:
    """sizes.json ({shard file: samples}, open_clip's) and, for tars, shardindex.json (wids': `wids_version`
    and a `shardlist` of `url` relative to the folder + `nsamples` + `filesize`), so wids.ShardListDataset
    reads the folder.

    Several workers finish shards at once: `finished()` (each whole shard's sample count and bytes) is read
    and the files written under an exclusive lock where the file system offers one, so the last writer's
    view includes every earlier commit.
    """
    store = open_store(root)
    with store.lock(DATASET_FILE):  # the one file every worker of this dataset shares
        found = dict(sorted(finished().items()))
        sizes = {name: n for name, (n, _) in found.items()}
        write_json(store, SIZES_FILE, sizes)
        if wids:
            shardlist = [{"url": name, "nsamples": n, "filesize": size} for name, (n, size) in found.items()]
            name = store.root.resolve().name if isinstance(store, LocalStore) else store.url().rsplit("/", 1)[-1]
            write_json(store, WIDS_INDEX, {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": name,
                                           "shardlist": shardlist})
