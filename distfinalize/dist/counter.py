"""A job-wide byte counter in the process group's store: every rank adds what it wrote, now and then; rank 0
reads the sum for the job's one progress bar. One store key, one small store call per rank per interval: never a
collective, never one call per tensor."""

from __future__ import annotations

from typing import TYPE_CHECKING

from distfinalize.dist.group import _default_store

if TYPE_CHECKING:
    from distfinalize.dist.context import DistContext


class JobCounter:
    """Bytes done across all ranks. Without a store (one process, or none reachable) it counts this rank only.
    Runs on: all ranks (add), rank 0 (total); from one thread of each."""

    def __init__(self, ctx: DistContext, key: str) -> None:
        self.key = f"distfinalize/{key}"
        self.store = _default_store() if ctx.world_size > 1 else None
        self.local = 0

    def add(self, nbytes: int) -> int:
        """Add `nbytes` for this rank; return the job's total so far (best effort)."""
        self.local += nbytes
        if self.store is None:
            return self.local
        try:
            return int(self.store.add(self.key, nbytes))
        except (RuntimeError, ValueError):  # the store is gone (a peer's failure ends the step anyway)
            self.store = None
            return self.local
