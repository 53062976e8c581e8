"""The commands, by name: finalize (what `distfinalize SRC DEST` runs), run (the same, launching the ranks),
inspect and verify.

Each is `main(argv) -> exit code` and runs under runner.run_guarded. A command's module is imported only when
it runs, so `distfinalize verify` never loads the finalize pipeline; inspect's and verify's arguments are checked
first by their parsers alone (commands/arguments.py), so --help and usage errors answer without importing torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def _finalize(argv: Sequence[str]) -> int:
    from distfinalize.commands.finalize import main

    return main(argv)


def _inspect(argv: Sequence[str]) -> int:
    from distfinalize.commands.arguments import inspect_args

    inspect_args(argv)  # --help and usage errors exit here, before the command (and torch) loads
    from distfinalize.commands.inspect import main

    return main(argv)


def _verify(argv: Sequence[str]) -> int:
    from distfinalize.commands.arguments import verify_args

    verify_args(argv)  # --help and usage errors exit here, before the command (and torch) loads
    from distfinalize.commands.verify import main

    return main(argv)


def _run(argv: Sequence[str]) -> int:
    from distfinalize.commands.run import main

    return main(argv)


SUBCOMMANDS: dict[str, Callable[[Sequence[str]], int]] = {"inspect": _inspect, "verify": _verify, "run": _run}


def command_for(argv: Sequence[str]) -> tuple[Callable[[Sequence[str]], int], list[str]]:
    """The command `argv` asks for and its own arguments: a subcommand named by the first word, else finalize
    (`distfinalize SRC DEST`, where SRC may be any path)."""
    if argv and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]], list(argv[1:])
    return _finalize, list(argv)
