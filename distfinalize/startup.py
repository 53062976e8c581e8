"""Process startup: large allocations get their own mappings (map_large_allocations); garbage collection stays
off while torch, torch.distributed.checkpoint and transformers import. They create millions of objects, none of
them garbage, and the collections that scan them cost about 0.6 s of a 2 s startup. Only the command line does
this (`python -m distfinalize`, the `distfinalize` command); a program that imports distfinalize keeps its own
settings."""

from __future__ import annotations

import gc
import time

STARTED: list[float] = []  # perf_counter() when the command line started (the summary's startup phase)

MMAP_THRESHOLD = 1 << 20  # bytes from which glibc's malloc maps an allocation of its own (see map_large_allocations)


def map_large_allocations() -> None:
    """Give every allocation of MMAP_THRESHOLD bytes or more its own mapping, returned to the system when freed.

    glibc's default threshold rises with every large block freed, up to 32 MiB, so tensors of a few MiB to 32 MiB
    (source tensors, their outputs, the quantizer's blocks) come from the heaps, freed in other threads than the
    ones that allocated them: the heaps fragment, and a finalize's peak RSS ends up about a third above what it holds.
    A fixed threshold keeps the resident size to the tensors alive. Left alone when MALLOC_MMAP_THRESHOLD_ is set,
    and where the C library is not glibc. Runs on: every rank, first thing (the command line only)."""
    import ctypes
    import os

    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, MMAP_THRESHOLD)  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def imports_starting() -> None:
    """Turn collection off for the startup imports, note the time, map large allocations (map_large_allocations),
    and start DISTFINALIZE_PROFILE's profiles (see Profiles). Runs on: every rank, first thing."""
    if not STARTED:
        STARTED.append(time.perf_counter())
    gc.disable()
    global _profiles
    if _profiles is None:
        map_large_allocations()
        _profiles = profiles_from_env()


def imports_done() -> None:
    """Turn collection back on when `imports_starting` turned it off, leaving the objects created so far out of
    every later collection. Runs on: every rank, once the source is prepared (transformers is imported then)."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


PROFILE_ENV = "DISTFINALIZE_PROFILE"


class Profiles:
    """`DISTFINALIZE_PROFILE=DIR`: cProfile every thread of this process and write one pstats file per thread name
    into DIR before the process's hard exit: `rank<R>-<thread>.pstats` (R from RANK or SLURM_PROCID, else 0; the
    main thread is `MainThread`, the pipeline's are `distfinalize-feed` and `distfinalize-write<N>`), or
    `launcher-<host>-<thread>.pstats` for the process of `distfinalize run` that starts a node's ranks
    (profile_as). Threads that are still running at the exit (the launcher's watchdogs) are left out. Runs on:
    every rank, when set."""

    def __init__(self, directory: str) -> None:
        import cProfile
        import threading

        self.directory = directory
        self.finished: list[tuple[str, object]] = []
        self.main = cProfile.Profile()
        run = threading.Thread.run
        finished = self.finished

        def profiled_run(thread: threading.Thread) -> None:
            profile = cProfile.Profile()
            profile.enable()
            try:
                run(thread)
            finally:
                profile.disable()
                finished.append((thread.name, profile))

        threading.Thread.run = profiled_run
        self.main.enable()

    def write(self) -> None:
        """Stop the main thread's profile and write every finished one (merged by thread name)."""
        import os
        import pstats

        self.main.disable()
        rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"
        prefix = PROFILE_NAME[-1] if PROFILE_NAME else f"rank{rank}"
        os.makedirs(self.directory, exist_ok=True)
        by_name: dict[str, pstats.Stats] = {}
        for name, profile in [("MainThread", self.main), *self.finished]:
            if name in by_name:
                by_name[name].add(profile)
            else:
                by_name[name] = pstats.Stats(profile)
        for name, stats in by_name.items():
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
            stats.dump_stats(os.path.join(self.directory, f"{prefix}-{safe}.pstats"))


PROFILE_NAME: list[str] = []  # profile_as's name, when this process is not a rank


def profile_as(name: str) -> None:
    """Name this process's profiles `name` instead of its rank's (the launcher of `distfinalize run`, whose
    environment may hold SLURM_PROCID, must not overwrite a rank's files). Runs on: the launching process."""
    PROFILE_NAME.append(name)


def profiles_from_env() -> Profiles | None:
    """Start profiling when DISTFINALIZE_PROFILE names a folder. Runs on: every rank, first thing."""
    import os

    directory = os.environ.get(PROFILE_ENV)
    return Profiles(directory) if directory else None


def write_profiles() -> None:
    """Write the profiles `imports_starting` started, if any. Runs on: every rank, just before the hard exit."""
    if _profiles is not None:
        _profiles.write()


_profiles: Profiles | None = None
