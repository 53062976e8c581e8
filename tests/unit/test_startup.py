"""Start-up cost: the command line (finalize, run, inspect, verify) answers --help and usage errors without importing
torch or any other heavy library, and sizes parse as transformers parses them without importing it."""

from __future__ import annotations

import subprocess
import sys

import pytest
from support import REPO, env

from distfinalize.config import parse_size

HEAVY = ("torch", "transformers", "peft", "torchao", "deepspeed", "accelerate", "huggingface_hub", "safetensors")
PROBE = """
import sys
from distfinalize.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    print("exit", exc.code, file=sys.stderr)
print("imported:" + ",".join(m for m in {heavy} if m in sys.modules), file=sys.stderr)
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["only-src"],
        ["src", "dest", "--max-shard-size", "lots"],
        ["src", "dest", "--dtype", "int3"],
        ["run", "--help"],
        ["inspect", "--help"],
        ["inspect"],
        ["inspect", "src", "--world-size", "0"],
        ["inspect", "src", "--max-shard-size", "lots"],
        ["verify", "--help"],
        ["verify"],
        ["verify", "dest", "--checkpoint", "ckpt"],
        ["verify", "dest", "--dtype", "int3"],
    ],
)
def test_help_and_usage_errors_import_no_heavy_library(argv: list[str]) -> None:
    probe = PROBE.format(heavy=HEAVY)
    result = subprocess.run(
        [sys.executable, "-c", probe, *argv], capture_output=True, text=True, env=env(), cwd=REPO, timeout=120
    )
    *_, exit_line, imported = result.stderr.strip().splitlines()
    assert exit_line == ("exit 0" if "--help" in argv else "exit 2"), result.stderr
    assert imported == "imported:", f"{argv} {imported}"


@pytest.mark.parametrize("text", ["5GB", "200MB", "1GiB", "64KiB", "3MiB", "12KB", "8Gb", "16mb", "1kB", " 7GB "])
def test_parse_size_matches_transformers(text: str) -> None:
    from transformers.utils.hub import convert_file_size_to_int

    assert parse_size(text) == convert_file_size_to_int(text.strip())
