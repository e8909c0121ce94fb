"""How workers split shards among themselves and wait for each other's, without a process group.

The bottom floor: the dataset job, the feature cache and the layer probe all split their shards this way.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


def shard_ranges(num_samples: int, shard_size: int) -> list[range]:
    return [range(s, min(s + shard_size, num_samples)) for s in range(0, num_samples, shard_size)]


def owned_shards(num_shards: int, rank: int, world_size: int) -> list[int]:
    """Round-robin: shard s belongs to worker s mod world_size."""
    return [s for s in range(num_shards) if s % world_size == rank]


def shard_order(num_shards: int, rank: int, world_size: int) -> list[int]:
    """The order a worker visits shards in: its own (`owned_shards`) first, then everyone else's from the
    last one back. A worker that runs out of work takes over unfinished shards nobody has claimed yet
    (the claim keeps two workers off one shard), so a resumed partial run, or one whose workers run at
    different speeds, keeps every GPU busy to the end; starting from the end meets the owners late."""
    own = owned_shards(num_shards, rank, world_size)
    return own + [s for s in reversed(range(num_shards)) if s % world_size != rank]


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
