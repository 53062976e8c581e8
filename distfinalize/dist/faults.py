"""The DISTFINALIZE_FAIL_AT testing hook: a rank fails, dies, hangs, is signalled or pauses at a named step
(dist/launch.py parses the variable).
"""

from __future__ import annotations

import logging
import os
import signal
import time

from distfinalize.dist.launch import FAULT_ENV
from distfinalize.errors import InjectedFailure

log = logging.getLogger(__name__)
PAUSE_S = 6.0


def inject_fault(fault: tuple[int, str, str], rank: int, step: str) -> None:
    """Fail as DISTFINALIZE_FAIL_AT asks when `fault` names this rank and `step`. Testing hook."""
    if fault[:2] != (rank, step):
        return
    mode = fault[2]
    log.warning("%s: rank %d fails at %r (%s)", FAULT_ENV, rank, step, mode)
    if mode == "exit":
        os._exit(3)
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if mode in ("term", "int"):
        os.kill(os.getpid(), signal.SIGTERM if mode == "term" else signal.SIGINT)
        return
    if mode == "pause":  # a slow rank: the others wait for it in the step's collective
        time.sleep(PAUSE_S)
        return
    while mode == "hang":
        time.sleep(3600)
    raise InjectedFailure(f"injected failure ({FAULT_ENV}={rank}:{step})", hint="a testing hook; unset it")
