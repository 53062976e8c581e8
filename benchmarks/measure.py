"""Run a command and measure it: wall time, peak RSS of its biggest process, page-cache eviction for cold runs."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
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
    cpu_s: float = 0.0  # user + system CPU seconds of the whole process tree (every waited-for descendant)


def torchrun(nproc: int, *args: str) -> list[str]:
    """`python -m torch.distributed.run --standalone --nproc_per_node=NPROC ARGS`."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


def free_port() -> int:
    """A TCP port nothing listens on now (for torchrun --master-port)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def finalize_cmd(nproc: int, src: Path, dest: Path, *options: str, plain: bool = False) -> list[str]:
    """distfinalize SRC DEST OPTIONS with `nproc` ranks under torchrun, quiet (warnings only); `plain`: one
    process, `python -m distfinalize`."""
    args = ["-m", "distfinalize", str(src), str(dest), "--log-level", "warning", *options]
    return [sys.executable, *args] if plain else torchrun(nproc, *args)


def run_measured(cmd: Sequence[str], env: dict[str, str] | None = None) -> Measurement:
    """Run `cmd` under a small wrapper process that reports the peak RSS of its biggest descendant.

    Linux records the pre-exec peak of a forked child, so a big parent (the driver) would leak its own RSS
    into a direct child's ru_maxrss; the wrapper starts small, and its children fork from it.
    """
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, *cmd], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    wall = time.perf_counter() - start
    output, _, last = proc.stdout.rstrip("\n").rpartition("\n")
    usage = json.loads(last) if last.startswith("{") else {}
    return Measurement(wall, usage.get("peak_rss_bytes", 0), proc.returncode, output, usage.get("cpu_s", 0.0))


def _wrapper_main(cmd: Sequence[str]) -> int:
    """Run `cmd`, then print {"peak_rss_bytes": ..., "cpu_s": ...}: the largest process in its tree (ru_maxrss, KiB)
    and the CPU time of the whole tree (user + system)."""
    returncode = subprocess.call(list(cmd), stderr=subprocess.STDOUT)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    sys.stdout.flush()
    print(json.dumps({"peak_rss_bytes": usage.ru_maxrss * 1024, "cpu_s": usage.ru_utime + usage.ru_stime}), flush=True)
    return returncode


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


def disk_write_read(
    directory: Path, size_bytes: int, streams: int = 1, block: int = 64 * 2**20
) -> tuple[float, float, float | None]:
    """(write GiB/s with fsync through the page cache, the same with O_DIRECT (None where the file system refuses
    it), cold read GiB/s) of `streams` files written and read at once in `directory`.

    The disk's own limits, `size_bytes` in all: each stream writes (then reads) its share in its own thread.
    """
    import mmap
    from concurrent.futures import ThreadPoolExecutor

    share = max(block, size_bytes // streams // block * block)
    paths = [directory / f"disk-probe-{i}.bin" for i in range(streams)]
    data = os.urandom(block)

    def write(path: Path) -> None:
        with open(path, "wb") as f:
            for _ in range(share // block):
                f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def write_direct(path: Path) -> None:
        aligned = mmap.mmap(-1, block)  # O_DIRECT needs an aligned buffer
        aligned[:] = data
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        try:
            for i in range(share // block):
                os.pwrite(fd, aligned, i * block)
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(path: Path) -> None:
        with open(path, "rb", buffering=0) as f:
            while f.read(block):
                pass

    def timed(fn) -> float:
        start = time.perf_counter()
        list(pool.map(fn, paths))
        return share * streams / (time.perf_counter() - start) / 2**30

    with ThreadPoolExecutor(streams) as pool:
        direct_bw = None
        if hasattr(os, "O_DIRECT"):
            try:
                direct_bw = timed(write_direct)
            except OSError:  # EINVAL: no O_DIRECT on this file system
                direct_bw = None
        write_bw = timed(write)
        evict(paths)
        read_bw = timed(read)
    for path in paths:
        path.unlink()
    return write_bw, direct_bw, read_bw


def pinned_copy() -> tuple[float, float] | None:
    """(host-to-device, device-to-host) GiB/s of a pinned 1 GiB buffer, or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    host = torch.empty(2**30, dtype=torch.uint8, pin_memory=True)
    device = torch.empty_like(host, device="cuda")
    rates = []
    for dst, src in ((device, host), (host, device)):
        dst.copy_(src, non_blocking=True)  # warm up
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(3):
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        rates.append(3 / (time.perf_counter() - start))
    return rates[0], rates[1]


if __name__ == "__main__":
    sys.exit(_wrapper_main(sys.argv[1:]))
