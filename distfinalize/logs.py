"""Rank-prefixed logging, the filters for third-party noise, and rank-0-only helpers.

The level: -q (warnings and errors), -v (debug: every rank's own bar, tracebacks), --log-level, else the
DISTFINALIZE_LOG_LEVEL environment variable, else info. Lines carry `[rankN]` in a job of several ranks; when
stderr is not a terminal (SLURM logs, pipes) every line is plain and timed: `HH:MM:SS [rankN] LEVEL message`, and
no bar is redrawn.
"""

from __future__ import annotations

import logging
import os
import re

LOG_LEVEL_ENV = "DISTFINALIZE_LOG_LEVEL"
_state = {"rank": 0}

# Messages other libraries log at import time that no user can act on, by logger name and message: torchao
# (imported by transformers) about its optional C++ kernels (CUDA-only builds, another torch version) and a
# missing triton; torch's pytree about libraries registering Enum subclasses with register_constant. Shown with -v.
NOISE_LOGGERS = {
    "torchao": re.compile(r"^Failed to load \S*_C\S*\.so|^Skipping import of cpp extensions"),
    "torchao.kernel.intmm": re.compile(r"Detected no triton"),
    "torch.utils._pytree": re.compile(r"register_constant\(\) on Enum subclasses is deprecated"),
}


class _Noise(logging.Filter):
    """Drops the records of `NOISE_LOGGERS` whose message matches: the library's other records still show."""

    def __init__(self, pattern: re.Pattern[str]) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet_third_party() -> None:
    """Install the narrow filters for third-party import-time messages. Idempotent; runs before the heavy imports
    (every rank, and scripts that import transformers: `import distfinalize.logs` is enough)."""
    for name, pattern in NOISE_LOGGERS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Noise) for f in logger.filters):
            logger.addFilter(_Noise(pattern))


def default_level() -> str:
    """DISTFINALIZE_LOG_LEVEL when set (lower-cased), else info."""
    return os.environ.get(LOG_LEVEL_ENV, "").strip().lower() or "info"


def setup_logging(level: str, rank: int, world_size: int) -> None:
    """Configure the `distfinalize` logger: one line per record, prefixed with the rank in a job of several ranks
    (and the time, when stderr is not a terminal). Runs on: all ranks."""
    _state["rank"] = rank
    handler = logging.StreamHandler()
    prefix = f"[rank{rank}] " if world_size > 1 else ""
    if handler.stream.isatty():
        handler.setFormatter(logging.Formatter(f"{prefix}%(levelname)s %(message)s"))
    else:  # a log file: every line also says when
        handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger("distfinalize")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    if level == "debug":
        for name in NOISE_LOGGERS:
            logger = logging.getLogger(name)
            logger.filters[:] = [f for f in logger.filters if not isinstance(f, _Noise)]
    else:
        quiet_third_party()


def is_rank0() -> bool:
    """Whether this process is rank 0 (as told to setup_logging)."""
    return _state["rank"] == 0


def log_rank0(logger: logging.Logger, msg: str, *args: object, level: int = logging.INFO) -> None:
    """Log on rank 0 only."""
    if is_rank0():
        logger.log(level, msg, *args)
