"""Who is still there: each rank's marks in the store (its process, its check-in at every step, its goodbye),
read by a survivor to name the rank that died or hung. Best effort: a store that cannot be reached tells nothing.

Runs on: every rank (the marks), every survivor of a failed collective (the diagnosis).
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any

from distfinalize.dist.group import _default_store, _short
from distfinalize.errors import RankFailure

if TYPE_CHECKING:
    from distfinalize.dist.context import DistContext

log = logging.getLogger(__name__)
DEATH_WAIT_S = 1.0  # how long a rank that lost a peer waits for the peer's process to be gone, or to say goodbye
DIAGNOSIS_S_PER_RANK = 0.002  # how long the diagnosing survivor may take per rank to look the check-ins up
STORE_PROBE_S = 5.0  # how long a look at the store may take on the way out (a dead store must not hang the exit)


def _host_key(host: str, number: int | str) -> str:
    return f"distfinalize/host/{host}/{number}"


def _exit_key(rank: int) -> str:
    return f"distfinalize/exit/rank{rank}"


def _alive(pid: int) -> bool:
    """Whether process `pid` (on this host) still runs: a zombie, dead but not yet reaped, does not."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        if os.path.isdir("/proc"):
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            pass
        return True
    return state not in ("Z", "X")


def dead_ranks(ctx: DistContext) -> list[int]:
    """Peers on this host whose process is gone though they never said they were leaving (SIGKILL, the OOM
    killer). Only this host's ranks are looked at (its list in the store), so the cost is the ranks per node.
    Peers on other hosts, or a store that cannot be reached, tell nothing. Runs on: any rank."""
    store = _default_store() if ctx.world_size > 1 else None
    if store is None:
        return []
    dead: set[int] = set()
    try:
        store.set_timeout(datetime.timedelta(seconds=STORE_PROBE_S))
        host = socket.gethostname()
        count = store.add(_host_key(host, "count"), 0)
        entries = store.multi_get([_host_key(host, n) for n in range(1, count + 1)]) if count else []
        pids = {int(r): int(pid) for r, pid in (e.decode().split() for e in entries) if int(r) != ctx.rank}
        deadline = time.monotonic() + DEATH_WAIT_S  # a killed process closes its sockets before it is gone
        while True:
            # gone first, then no goodbye: a rank leaves its mark before it exits
            dead |= {r for r, pid in pids.items() if not _alive(pid) and not store.check([_exit_key(r)])}
            unsure = [r for r in pids if r not in dead and not store.check([_exit_key(r)])]
            if not unsure or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    except (RuntimeError, OSError, ValueError) as exc:
        log.debug("cannot tell which ranks are alive: %s", _short(exc))
    return sorted(dead)


def step_key(ctx: DistContext, rank: int) -> str:
    return f"distfinalize/step{ctx._steps}/rank{rank}"


def check_in(ctx: DistContext) -> None:
    """Leave a mark in the store before the step's collective, so the others can tell who never came."""
    store = _default_store() if ctx.world_size > 1 else None
    if store is not None:
        store.set(step_key(ctx, ctx.rank), "1")


def publish_process(ctx: DistContext) -> None:
    """This rank's pid in its host's list in the store, so that a peer on the host can tell whether it died.
    Runs on: all ranks."""
    store = _default_store() if ctx.world_size > 1 else None
    if store is not None:
        try:
            host = socket.gethostname()
            store.set(_host_key(host, store.add(_host_key(host, "count"), 1)), f"{ctx.rank} {os.getpid()}")
        except (RuntimeError, OSError) as exc:
            log.debug("cannot publish this rank's process: %s", _short(exc))


def mark(ctx: DistContext, state: str) -> None:
    """Say goodbye in the store (best effort): this rank leaves on purpose, it did not die."""
    store = _default_store() if ctx.world_size > 1 else None
    if store is None:
        return
    try:
        store.set_timeout(datetime.timedelta(seconds=STORE_PROBE_S))
        store.set(_exit_key(ctx.rank), state)
    except (RuntimeError, OSError) as exc:
        log.debug("cannot reach the store on the way out: %s", _short(exc))


def lost_peer(ctx: DistContext, step: str, exc: RuntimeError) -> RankFailure:
    """The error for a collective that failed because a peer died, hung, or the group broke.

    Its `report_rank` says which rank should print it: the lowest rank still alive (rank 0 usually, but
    not when rank 0 is the one that is gone); every rank when nobody can tell. A lost rank may have finished
    files that --resume can reuse: `keeps_staging`. Runs on: every survivor.
    """
    cause = _short(exc)
    missing: list[int] | None = None
    store = _default_store()
    if store is not None:
        try:
            missing = missing_ranks(ctx, store)
        except (RuntimeError, OSError, ValueError) as store_exc:
            log.debug("cannot reach the store after a failed collective: %s", _short(store_exc))
            if ctx.launcher == "slurm":  # under srun, rank 0 hosts the store: it is rank 0 that is gone
                missing, cause = [0], f"{cause}; its store is gone too"
    if missing:
        others = f" (and {len(missing) - 1} more rank(s))" if len(missing) > 1 else ""
        failure = RankFailure(
            f"rank {missing[0]} failed during {step}{others}",
            where=f"it died or stopped responding ({cause})",
            hint="see that rank's own output for why",
        )
        failure.report_rank = min(set(range(ctx.world_size)) - set(missing))
    else:
        failure = RankFailure(
            f"a rank failed during {step}",
            where=f"the process group broke ({cause})",
            hint="see the other ranks' output; rank 0, which holds the store, may be gone",
        )
        failure.report_rank = ctx.rank
    failure.keeps_staging = True
    return failure


def missing_ranks(ctx: DistContext, store: Any) -> list[int]:
    """The ranks that never checked in at this step. One survivor (the first to claim it) looks every rank up
    and leaves the answer in the store; the others read that answer, so a failure costs the store O(ranks)
    look-ups, not O(ranks) per survivor. Runs on: every survivor of a failed collective."""
    key = f"distfinalize/diagnosis/step{ctx._steps}"
    store.set_timeout(datetime.timedelta(seconds=STORE_PROBE_S + DIAGNOSIS_S_PER_RANK * ctx.world_size))
    if store.add(f"{key}/claim", 1) == 1:
        everyone = [step_key(ctx, r) for r in range(ctx.world_size)]
        missing = [] if store.check(everyone) else [r for r, k in enumerate(everyone) if not store.check([k])]
        store.set(key, ",".join(map(str, missing)))
        return missing
    return [int(r) for r in store.get(key).decode().split(",") if r]
