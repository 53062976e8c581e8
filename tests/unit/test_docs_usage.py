"""The documentation against the code: docs/usage.md's generated options tables match the argparse parsers, the
commands in README.md and docs/ use options the parsers have, and relative links point at existing files."""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [
    ROOT / "README.md",
    ROOT / "BENCHMARKS.md",
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted((ROOT / "benchmarks" / "results").glob("*.md")),
]


def load_usage_table():
    spec = importlib.util.spec_from_file_location("usage_table", ROOT / "scripts" / "usage_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("usage_table", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def usage_table():
    return load_usage_table()


def test_usage_table_matches_parsers(usage_table):
    text = usage_table.USAGE_DOC.read_text()
    _, block, _ = usage_table.split_doc(text)
    assert block.strip() == usage_table.render().strip(), (
        f"docs/usage.md's options tables differ from the argparse parsers: run `{usage_table.REGENERATE}`"
    )


def test_usage_table_write_replaces_only_the_block(usage_table):
    doc = f"# title\n\nbefore\n\n{usage_table.BEGIN}\nstale table\n{usage_table.END}\n\nafter\n"
    rewritten = usage_table.with_block(doc, "| new |\n")
    assert rewritten == f"# title\n\nbefore\n\n{usage_table.BEGIN}\n| new |\n{usage_table.END}\n\nafter\n"
    assert usage_table.with_block(rewritten, "| new |\n") == rewritten
    with pytest.raises(ValueError, match="markers"):
        usage_table.split_doc("no markers here")


def test_usage_table_covers_every_command_and_option(usage_table):
    rendered = usage_table.render()
    for prefix, parser in usage_table.parsers():
        assert f"### `{prefix}`" in rendered
        for action in parser._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert f"`{option}" in rendered, f"{option} of {prefix} is missing from the table"


def fenced_lines(text: str) -> list[str]:
    """The lines of fenced code blocks, with backslash continuations joined and comments dropped (JSON blocks, such
    as the benchmark results' figures, hold no command lines and are left out)."""
    lines, inside, data, pending = [], False, False, ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("```"):
            inside = not inside
            data = inside and raw.strip().removeprefix("```").strip() == "json"
            continue
        if not inside or data:
            continue
        line = pending + raw.split(" #", 1)[0].rstrip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        lines.append(line.strip())
    return lines


def distfinalize_invocations(path: Path) -> list[tuple[str, list[str]]]:
    """(line, the words after `distfinalize`) of every command line in a code block that runs distfinalize."""
    found = []
    for line in fenced_lines(path.read_text()):
        match = re.search(r"(?:^|\s)(?:-m\s+)?distfinalize(\s.*)?$", line)
        if match and not re.search(r"\[(quant|lora|deepspeed|dev)", line):
            found.append((line, shlex.split(match.group(1) or "", posix=True)))
    return found


def test_commands_in_docs_use_real_options(usage_table):
    parsers = {prefix.split()[1] if prefix.count(" ") == 1 else "": p for prefix, p in usage_table.parsers()}
    options = {name: {o for a in p._actions for o in a.option_strings} for name, p in parsers.items()}
    options["run"] |= options[""]  # `distfinalize run ... SRC DEST` takes every finalize option after SRC DEST
    checked = 0
    for path in DOCS:
        for line, words in distfinalize_invocations(path):
            command = words[0] if words and words[0] in options else ""
            for word in words:
                for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", word):
                    assert flag in options[command], (
                        f"{path.relative_to(ROOT)}: `{line}` uses {flag}, which "
                        f"`distfinalize {command or 'SRC DEST'}` does not have"
                    )
                    checked += 1
    assert checked > 20


def test_relative_links_resolve():
    broken = []
    for path in DOCS:
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            file_part = target.split("#", 1)[0]
            if not (path.parent / file_part).resolve().exists():
                broken.append(f"{path.relative_to(ROOT)} -> {target}")
    assert not broken, f"links to missing files: {broken}"


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors of a markdown file's headings."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    anchors = set()
    for heading in re.findall(r"^#+\s+(.+)$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def test_link_anchors_resolve():
    broken = []
    for path in DOCS:
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target) or "#" not in target:
                continue
            file_part, anchor = target.split("#", 1)
            linked = (path.parent / file_part).resolve() if file_part else path
            if linked.suffix == ".md" and anchor not in heading_anchors(linked):
                broken.append(f"{path.relative_to(ROOT)} -> {target}")
    assert not broken, f"links to missing headings: {broken}"


def test_readme_keeps_the_first_two_commands():
    readme = (ROOT / "README.md").read_text()
    for command in ("bash scripts/demo.sh", "bash scripts/test.sh"):
        assert command in readme
        assert (ROOT / command.split()[1]).is_file()
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
