"""The write step's progress and its stage meter.

One bar for the job, drawn by rank 0: the bytes every rank wrote (a store counter each rank adds to about once a
second, dist/counter.py), the speed and the time left. With -v (debug) each rank draws its own bar instead. When
stderr is not a terminal (a SLURM log), rank 0 logs a plain progress line every PLAIN_EVERY_S seconds instead of
redrawing. The meter adds up the seconds each stage of the write pipeline was busy (read, transform, write) and the
bytes read, for the closing summary. Runs on: every rank (its writer threads call update).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from distfinalize.config import format_bytes
from distfinalize.dist.counter import JobCounter

if TYPE_CHECKING:
    from distfinalize.dist.context import DistContext

log = logging.getLogger(__name__)

PLAIN_EVERY_S = 30.0
STAGES = ("read", "transform", "write")


class Meter:
    """Busy seconds per stage, bytes read and written, for this rank. Thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.busy_s = dict.fromkeys(STAGES, 0.0)
        self.read_bytes = 0
        self.done = 0  # bytes of this rank's files written (or reused)

    @contextlib.contextmanager
    def busy(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            with self.lock:
                self.busy_s[stage] += time.perf_counter() - start

    def read(self, nbytes: int) -> None:
        with self.lock:
            self.read_bytes += nbytes

    def update(self, nbytes: int) -> None:
        """`nbytes` more of this rank's output are written (the writer threads call it)."""
        with self.lock:
            self.done += nbytes


class Progress(Meter):
    """The meter, and the bar it feeds: the job's (rank 0), this rank's (-v), or none (-q). A context manager:
    the drawing thread runs inside it. Runs on: every rank."""

    def __init__(self, ctx: DistContext, job_bytes: int, rank_bytes: int, mode: str) -> None:
        super().__init__()
        self.ctx, self.job_bytes, self.rank_bytes, self.mode = ctx, job_bytes, rank_bytes, mode
        self.counter = JobCounter(ctx, "written") if mode == "job" else None
        self.interval = max(1.0, ctx.world_size / 512)  # at most ~512 store calls a second, whatever the job size
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.bar: tqdm | None = None
        self.plain = not sys.stderr.isatty()
        self.sent = 0
        self.draws = False

    def __enter__(self) -> Progress:
        draws = self.draws = (self.mode == "job" and self.ctx.is_rank0) or self.mode == "rank"
        if draws and not self.plain:
            total = self.job_bytes if self.mode == "job" else self.rank_bytes
            desc = "writing" if self.mode == "job" else f"rank {self.ctx.rank} writing"
            self.bar = tqdm(total=total, unit="iB", unit_scale=True, unit_divisor=1024, desc=desc, mininterval=1.0)
        if self.mode != "off" and (draws or self.counter is not None):
            self.thread = threading.Thread(target=self._run, name="distfinalize-progress", daemon=True)
            self.thread.start()
        return self

    def finished(self) -> None:
        """Every rank's write step succeeded: the bar shows the whole job. Runs on: all ranks."""
        self._stop()
        if self.bar is not None:
            self.bar.update(self.bar.total - self.bar.n)

    def __exit__(self, *exc: object) -> None:
        self._stop()
        if self.bar is not None:
            self.bar.close()

    def _stop(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=2 * self.interval + 5)

    def _run(self) -> None:
        last_plain = start = time.perf_counter()
        while not self.stop.wait(self.interval):
            job = self._tick()
            if self.bar is not None:
                self.bar.update(max(0, job - self.bar.n))
            elif self.plain and self.draws and time.perf_counter() - last_plain >= PLAIN_EVERY_S:
                last_plain = time.perf_counter()
                self._log_plain(job, last_plain - start)
        self._tick()

    def _tick(self) -> int:
        """Send this rank's new bytes to the job counter; the job's total (this rank's alone with -v)."""
        with self.lock:
            new, self.sent = self.done - self.sent, self.done
        if self.counter is None:
            return self.done
        return self.counter.add(new)

    def _log_plain(self, job: int, elapsed: float) -> None:
        total = self.job_bytes if self.mode == "job" else self.rank_bytes
        rate = job / elapsed if elapsed > 0 else 0.0
        eta = f", {(total - job) / rate:.0f} s left" if rate > 0 else ""
        log.info(
            "writing: %d%% (%s of %s), %s/s%s",
            100 * job // max(total, 1),
            format_bytes(job),
            format_bytes(total),
            format_bytes(rate),
            eta,
        )
