"""Command line: arguments -> FinalizeConfig -> pipeline.run, and one-line errors with what to do next.

python -m distfinalize SRC DEST [options]
torchrun --nproc_per_node=N -m distfinalize SRC DEST [options]
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from distfinalize.commands.finalize import build_parser, format_plan, parse_config
from distfinalize.commands.runner import emit, run_guarded
from distfinalize.startup import imports_starting

if TYPE_CHECKING:
    from distfinalize.dist.context import DistContext

log = logging.getLogger("distfinalize")


# Subcommands: `distfinalize NAME ...`, each a module with main(argv) -> int. Anything else is a finalize.
COMMANDS = {
    "inspect": "distfinalize.commands.inspect",
    "verify": "distfinalize.commands.verify",
}


def console_main() -> None:
    """The `distfinalize` command and `python -m distfinalize`: main(), then a hard exit.

    The exit skips interpreter teardown, where gloo's background threads sometimes abort a rank that has
    already finished ("terminate called without an active exception", exit -6, seen about once in 50 runs
    on CPU), turning a successful job into a failed one. Everything is flushed and closed first.
    """
    imports_starting()  # __main__ did it before importing this module; the `distfinalize` script starts here
    try:
        code = main()
    except KeyboardInterrupt:  # Ctrl-C before the run was set up, or a second one on the way out: no traceback
        code = 130
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv`, run finalize or a subcommand, and return the exit code (no process exit)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        import importlib

        return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])
    config = parse_config(build_parser(), argv)

    def finalize(ctx: DistContext) -> int:
        from distfinalize.pipeline import run

        outcome = run(config, ctx)
        if ctx.is_rank0 and outcome.dry_run:
            emit(format_plan(outcome.plan))
            emit(json.dumps({k: v for k, v in outcome.report.items() if k != "plan"}, indent=2))
        return 0

    return run_guarded(finalize, log_level=config.log_level, device=config.device, timeout_s=config.timeout_s)
