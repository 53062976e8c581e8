"""The guarded runner every command shares: logging, the DistContext, and one line per failure."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING

from distfinalize.errors import DistfinalizeError

if TYPE_CHECKING:
    from distfinalize.dist.context import DistContext


PROG = "distfinalize"


def positive_seconds(text: str) -> float:
    """argparse type of --timeout: a positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def add_timeout_option(parser: argparse.ArgumentParser) -> None:
    """--timeout, the same for finalize, inspect and verify."""
    parser.add_argument(
        "--timeout",
        type=positive_seconds,
        default=1800.0,
        metavar="SECONDS",
        help="how long a rank waits for the others at each step (default: %(default)s)",
    )


def add_log_options(parser: argparse.ArgumentParser) -> None:
    """-q, -v and --log-level (one of them); the default is DISTFINALIZE_LOG_LEVEL, else info."""
    from distfinalize.config import LOG_LEVELS

    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", dest="log_level", action="store_const", const="warning", help="warnings only")
    group.add_argument(
        "-v", "--verbose", dest="log_level", action="store_const", const="debug", help="debug: each rank's own bar"
    )
    group.add_argument(
        "--log-level", choices=LOG_LEVELS, help="default: $DISTFINALIZE_LOG_LEVEL, else info (-q: warning, -v: debug)"
    )


def log_level(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The level -q/-v/--log-level chose, else DISTFINALIZE_LOG_LEVEL's (checked: a bad one is a usage error)."""
    from distfinalize.config import LOG_LEVELS
    from distfinalize.logs import LOG_LEVEL_ENV, default_level

    if args.log_level is not None:
        return args.log_level
    level = default_level()
    if level not in LOG_LEVELS:
        parser.error(f"{LOG_LEVEL_ENV}={level!r} is not one of {', '.join(LOG_LEVELS)}")
    return level


def run_guarded(job: Callable[[DistContext], int], *, log_level: str, device: str, timeout_s: float) -> int:
    """Set up logging and the DistContext, run `job`, and turn every failure into one line and an exit code.

    Runs on: all ranks. Used by finalize and by every subcommand.
    """
    from distfinalize.dist.context import DistContext
    from distfinalize.dist.launch import detect_launch
    from distfinalize.logs import setup_logging

    rank, world_size = 0, 1
    with contextlib.suppress(DistfinalizeError):  # a bad environment is reported by DistContext.from_env below
        launch = detect_launch()  # torchrun, accelerate launch, plain srun, or a single process
        rank, world_size = launch.rank, launch.world_size
    setup_logging(log_level, rank, world_size)
    ctx = None
    try:
        ctx = DistContext.from_env(device, timeout_s)
        return job(ctx)
    except DistfinalizeError as exc:
        if ctx is None:  # before the ranks could agree on anything (environment, device, process group):
            exc.report_rank = rank  # every rank that fails says why itself
        report(exc, rank, log_level)
        return exc.exit_code
    except KeyboardInterrupt as exc:  # SIGINT/SIGTERM before the staging dir (the pipeline reports it after)
        if ctx is None:
            report_line("interrupted; nothing was written to DEST", rank)
            return 130
        error = ctx.interruption(exc, "nothing was written to DEST")
        report(error, rank, log_level)
        return error.exit_code
    except Exception as exc:  # a bug, not a user mistake: say so, with the traceback
        report_line(f"internal error ({type(exc).__name__}: {exc}); please report it with the traceback below", rank)
        traceback.print_exc()
        return 70
    finally:
        if ctx is not None:
            ctx.close()  # never raises


def report(exc: DistfinalizeError, rank: int, log_level: str) -> None:
    """One line on stderr, from one rank: rank 0 (or, when rank 0 is gone, the lowest surviving rank): its own
    error, or which rank failed during which step and why. Every rank agrees on failures at each step
    (DistContext.run_step). Other ranks print their line, and every rank its traceback, only with debug.
    """
    if rank == exc.report_rank or log_level == "debug":
        report_line(str(exc), rank)
    if log_level == "debug":
        traceback.print_exc()


def emit(text: str) -> None:
    """A command's result on stdout (plans, tables, JSON): the one place the package prints results."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def report_line(message: str, rank: int) -> None:
    prefix = f"[rank{rank}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    sys.stderr.write(f"{prefix}{PROG}: error: {message}\n")
    sys.stderr.flush()
