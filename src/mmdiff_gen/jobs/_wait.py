"""Waiting for other workers' files without a process group: poll, and give up once nothing progresses."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

STALL_S = 1800.0  # no file finished for 30 minutes while shards take minutes each: a worker has stopped


def wait_for(done: Callable[[], int], total: int, what: str, *, stall_s: float = STALL_S, poll_s: float = 2.0) -> None:
    """Block until `done()` reaches `total`. Raises TimeoutError when it has not grown for `stall_s` seconds,
    so a worker that died (srun keeps the others running) stops the rest instead of hanging them."""
    last, since, said = done(), time.monotonic(), False
    while last < total:
        if not said:
            print(f"waiting for the other workers: {what} {last}/{total}", file=sys.stderr, flush=True)
            said = True
        time.sleep(poll_s)
        now = done()
        if now > last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > stall_s:
            raise TimeoutError(f"{what}: {last}/{total} done and none finished in {stall_s / 60:.0f} min: has a "
                               "worker stopped? Re-run every worker to resume")
