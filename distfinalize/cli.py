"""Command line: argv -> a command, and its exit code.

    python -m distfinalize SRC DEST [options]          finalize (also under torchrun / srun)
    python -m distfinalize inspect SRC [options]
    python -m distfinalize verify DEST [--source SRC]

cli only dispatches: each command in distfinalize.commands parses its own arguments and runs under the
shared guarded runner, which turns every failure into one line and an exit code.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from distfinalize.commands import command_for
from distfinalize.startup import imports_starting, write_profiles


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
    write_profiles()  # DISTFINALIZE_PROFILE=DIR: each thread's cProfile (startup.Profiles)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command `argv` names (a finalize unless its first word is a subcommand); return the exit code."""
    command, args = command_for(list(sys.argv[1:] if argv is None else argv))
    return command(args)
