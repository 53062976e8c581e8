"""Rank-prefixed logging and rank-0-only helpers."""

from __future__ import annotations

import logging

_state = {"rank": 0}
# Loggers that print on every rank when transformers imports torchao (missing CUDA-only extensions,
# pytree deprecations): kept for --log-level debug only.
THIRD_PARTY_NOISE = ("torchao", "torch.utils._pytree")


def setup_logging(level: str, rank: int, world_size: int) -> None:
    """Configure the `distfinalize` logger: one line per record, prefixed with the rank. Runs on: all ranks."""
    _state["rank"] = rank
    prefix = f"[rank{rank}] " if world_size > 1 else ""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"{prefix}%(levelname)s %(message)s"))
    root = logging.getLogger("distfinalize")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    quiet = logging.DEBUG if level == "debug" else logging.ERROR
    for name in THIRD_PARTY_NOISE:
        logging.getLogger(name).setLevel(quiet)


def is_rank0() -> bool:
    """Whether this process is rank 0 (as told to setup_logging)."""
    return _state["rank"] == 0


def log_rank0(logger: logging.Logger, msg: str, *args: object, level: int = logging.INFO) -> None:
    """Log on rank 0 only."""
    if is_rank0():
        logger.log(level, msg, *args)
