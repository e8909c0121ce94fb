"""Job progress: a rich bar on a terminal, periodic plain lines in logs (SLURM files are not terminals)."""

from __future__ import annotations

import sys
import time


class JobProgress:
    """Counts samples and per-stage seconds; shows an ETA.

    Args:
        total: samples this worker will produce in this run.
        label: shown before the counts (e.g. "worker 0/2").
        interval: seconds between plain lines when stderr is not a terminal.
        enabled: False silences it (library use, tests).
    """

    def __init__(self, total: int, label: str = "generate", interval: float = 30.0, enabled: bool = True):
        self.total, self.label, self.interval, self.enabled = total, label, interval, enabled
        self.done = 0
        self.stages: dict[str, float] = {}
        self._t0 = self._last = time.perf_counter()
        self._bar = None
        if enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            # Our own rate and ETA (from the start), not rich's: its estimate needs updates within a 30 s window,
            # and a FLUX batch takes longer, so its ETA column stayed blank.
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[stages]}"), transient=False, console=Console(stderr=True))
            self._task = self._bar.add_task(label, total=total, stages="")
            self._bar.start()

    def add_time(self, stage: str, seconds: float) -> None:
        self.stages[stage] = self.stages.get(stage, 0.0) + seconds

    def stage_text(self) -> str:
        return " · ".join(f"{k} {v:.1f}s" for k, v in self.stages.items())

    def advance(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        rate = self.done / max(now - self._t0, 1e-9)  # samples (images) per second since the start
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done,
                             stages=f"{rate:.2f} img/s · eta {_clock(eta)} · {self.stage_text()}")
            return
        if self.enabled and (now - self._last >= self.interval or self.done >= self.total):
            self._last = now
            print(f"[{self.label}] {self.done}/{self.total} samples, {rate:.2f}/s, eta {_clock(eta)}"
                  f" ({self.stage_text()})", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _clock(seconds: float) -> str:
    """h:mm:ss, or ? before the first sample."""
    if seconds == float("inf"):
        return "?"
    s = int(seconds + 0.5)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
