"""Process startup: garbage collection stays off while torch, torch.distributed.checkpoint and transformers
import. They create millions of objects, none of them garbage, and the collections that scan them cost about
0.6 s of a 2 s startup. Only the command line does this (`python -m distfinalize`, the `distfinalize`
command); a program that imports distfinalize keeps its own settings."""

from __future__ import annotations

import gc
import time

STARTED: list[float] = []  # perf_counter() when the command line started (the summary's startup phase)


def imports_starting() -> None:
    """Turn collection off for the startup imports, and note the time. Runs on: every rank, first thing."""
    if not STARTED:
        STARTED.append(time.perf_counter())
    gc.disable()


def imports_done() -> None:
    """Turn collection back on when `imports_starting` turned it off, leaving the objects created so far out of
    every later collection. Runs on: every rank, once the source is prepared (transformers is imported then)."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()
