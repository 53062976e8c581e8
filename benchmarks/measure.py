"""Run a command and measure it: wall time, peak RSS of its biggest process, page-cache eviction for cold runs."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Measurement:
    wall_s: float
    peak_rss_bytes: int  # max over the process and all its (waited-for) descendants: torchrun's ranks included
    returncode: int
    output: str


def run_measured(cmd: Sequence[str], env: dict[str, str] | None = None) -> Measurement:
    """Run `cmd`; os.wait4 gives the peak RSS of the largest process in its tree (Linux ru_maxrss, KiB)."""
    start = time.perf_counter()
    proc = subprocess.Popen(list(cmd), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Measurement(wall, usage.ru_maxrss * 1024, proc.returncode, output)


def evict(paths: Sequence[Path]) -> None:
    """Drop the page cache of every file under `paths` (POSIX_FADV_DONTNEED after fsync): a cold read follows.

    Works without root, unlike /proc/sys/vm/drop_caches; pages that another process pins may survive.
    """
    for root in paths:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def disk_write_read(directory: Path, size_bytes: int, block: int = 64 * 2**20) -> tuple[float, float]:
    """(write GiB/s with fsync, cold read GiB/s) of one file in `directory`: the disk's own limits."""
    path = directory / "disk-probe.bin"
    data = os.urandom(block)
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(size_bytes // block):
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    write = size_bytes / (time.perf_counter() - start) / 2**30
    evict([path])
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(block):
            pass
    read = size_bytes / (time.perf_counter() - start) / 2**30
    path.unlink()
    return write, read
