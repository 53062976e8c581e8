"""Generate the options tables of docs/usage.md from distfinalize's argparse parsers.

    python scripts/usage_table.py            # print the tables (markdown) on stdout
    python scripts/usage_table.py --write    # rewrite the block between the markers in docs/usage.md
    python scripts/usage_table.py --check    # exit 1 when docs/usage.md differs from the parsers

One table per command (finalize, then each subcommand), one per argument group: option, default, help.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

# Where the parsers live: a command is a module of distfinalize.commands with its own build_parser(), except
# inspect's and verify's, which live apart from their commands (commands/arguments.py); finalize is the default
# command, the others are named by their first word.
from distfinalize.commands import SUBCOMMANDS as SUBCOMMAND_NAMES
from distfinalize.commands.arguments import inspect_parser, verify_parser
from distfinalize.commands.finalize import build_parser as build_finalize_parser

PARSERS = {"inspect": inspect_parser, "verify": verify_parser}
SUBCOMMANDS = {name: PARSERS.get(name, f"distfinalize.commands.{name}") for name in SUBCOMMAND_NAMES}

ROOT = Path(__file__).resolve().parent.parent
USAGE_DOC = ROOT / "docs" / "usage.md"
BEGIN = "<!-- usage-table:begin -->"
END = "<!-- usage-table:end -->"
REGENERATE = "python scripts/usage_table.py --write"


def subcommand_parser(target: object) -> argparse.ArgumentParser:
    """The parser of one subcommand, whether the registry holds a module path, a module or a parser builder."""
    if isinstance(target, str):
        target = importlib.import_module(target)
    builder = getattr(target, "build_parser", target)
    if not callable(builder):
        raise TypeError(f"cannot find a parser builder in {target!r}")
    return builder()


def parsers() -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """(command line prefix, parser): finalize first, then the subcommands in registry order."""
    yield "distfinalize SRC DEST", build_finalize_parser()
    for name, target in SUBCOMMANDS.items():
        yield f"distfinalize {name}", subcommand_parser(target)


def cell(text: str) -> str:
    """Text safe inside a markdown table cell (pipes escaped, one line)."""
    return " ".join(text.split()).replace("|", "\\|")


def code(text: str) -> str:
    return f"`{cell(text)}`"


def option_cell(action: argparse.Action) -> str:
    if not action.option_strings:
        return code(action.metavar or action.dest.upper())
    names = ", ".join(action.option_strings)
    if action.nargs == 0:
        return ", ".join(code(name) for name in action.option_strings)  # `-q`, `--quiet`
    if action.metavar is not None:
        value = action.metavar
    elif action.choices is not None:
        value = "{" + ",".join(str(c) for c in action.choices) + "}"
    else:
        value = action.dest.upper()
    if action.nargs == "?":
        value = f"[{value}]"
    return code(f"{names} {value}")


def default_cell(action: argparse.Action) -> str:
    default = action.default
    if action.nargs == "?" and action.const is not None and default is None:
        return f"off; bare: {code(str(action.const))}"
    if action.nargs == 0 or default in (None, [], argparse.SUPPRESS):
        return ""
    return code(str(default))


def help_cell(action: argparse.Action, prog: str) -> str:
    """argparse's own expansion of %(default)s and friends, then the choices when the option has a metavar."""
    text = action.help or ""
    if "%" in text:
        params = {k: v for k, v in vars(action).items() if v is not argparse.SUPPRESS}
        params["prog"] = prog
        for key in ("choices",):
            if params.get(key) is not None:
                params[key] = ", ".join(str(c) for c in params[key])
        text = text % params
    if action.choices is not None and action.metavar is not None:
        text = f"{text} (one of {', '.join(str(c) for c in action.choices)})".strip()
    if action.option_strings and action.required:
        text = f"required; {text}"
    return cell(text)


def groups(parser: argparse.ArgumentParser) -> Iterator[tuple[str, list[argparse.Action]]]:
    for group in parser._action_groups:  # argparse keeps the groups only here
        actions = [a for a in group._group_actions if not isinstance(a, argparse._HelpAction)]
        if actions:
            yield group.title or "options", actions


def table(prefix: str, parser: argparse.ArgumentParser) -> str:
    lines = [f"### `{prefix}`", ""]
    for title, actions in groups(parser):
        lines += [f"**{title}**", "", "| option | default | help |", "|---|---|---|"]
        lines += [f"| {option_cell(a)} | {default_cell(a)} | {help_cell(a, parser.prog)} |" for a in actions]
        lines.append("")
    return "\n".join(lines)


def render(parser_source: Callable[[], Iterator[tuple[str, argparse.ArgumentParser]]] = parsers) -> str:
    """The whole generated block, without the markers."""
    note = f"<!-- generated from the argparse parsers by `{REGENERATE}`; do not edit by hand -->"
    return "\n".join([note, "", *(table(prefix, parser) for prefix, parser in parser_source())]).rstrip() + "\n"


def split_doc(text: str) -> tuple[str, str, str]:
    """(before the begin marker, the block between the markers, from the end marker on)."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{USAGE_DOC} lacks the markers {BEGIN} ... {END}")
    head = text[: start + len(BEGIN)]
    return head, text[len(head) : end], text[end:]


def with_block(text: str, block: str) -> str:
    head, _, tail = split_doc(text)
    return f"{head}\n{block}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"rewrite the generated block of {USAGE_DOC.name}")
    mode.add_argument("--check", action="store_true", help=f"exit 1 when {USAGE_DOC.name} is out of date")
    args = parser.parse_args(argv)
    block = render()
    if not (args.write or args.check):
        sys.stdout.write(block)
        return 0
    current = USAGE_DOC.read_text()
    wanted = with_block(current, block)
    if args.check:
        if current != wanted:
            print(f"{USAGE_DOC} is out of date with the parsers: run `{REGENERATE}`", file=sys.stderr)
            return 1
        return 0
    if current != wanted:
        USAGE_DOC.write_text(wanted)
        print(f"rewrote the usage tables in {USAGE_DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
