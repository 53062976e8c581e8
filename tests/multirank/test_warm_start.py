"""Start-up on a warm cache: a second finalize of the same model (the model check's cache filled by the first)
imports no transformers at all, neither for the model check nor for the generation config, and writes the same
generation_config.json and weights. The run's tokenizer files are left out of the copy finalized here (a tokenizer
is loaded and saved through transformers). One process in a fresh interpreter each time (the test process has
imported transformers already). Marked `dist`: the checkpoint comes from a real 2-rank FSDP2 run."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from launching import ARGS, VARIANT, bare_env
from support import TIMEOUT_S, tree_digest

pytestmark = pytest.mark.dist

PROBE = """
import sys
from distfinalize.cli import main
code = main(sys.argv[1:])
print(f"exit {code} transformers {'transformers' in sys.modules}", file=sys.stderr)
"""


def finalize_probe(src: Path, dest: Path, cache: Path) -> str:
    """The probe's last line: the exit code and whether transformers was imported."""
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(src), str(dest), *ARGS, "-q"],
        capture_output=True,
        text=True,
        env=bare_env(DISTFINALIZE_CACHE_DIR=str(cache)),
        timeout=TIMEOUT_S,
    )
    return result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"no output, exit {result.returncode}"


def test_warm_run_imports_no_transformers(fsdp2_runs: Path, tmp_path: Path) -> None:
    src, cache = tmp_path / "run", tmp_path / "cache"
    shutil.copytree(fsdp2_runs / VARIANT, src, ignore=shutil.ignore_patterns("tokenizer*", "*.pt"))
    assert finalize_probe(src, tmp_path / "cold", cache) == "exit 0 transformers True"  # builds the model
    assert finalize_probe(src, tmp_path / "warm", cache) == "exit 0 transformers False"
    cold, warm = tree_digest(tmp_path / "cold"), tree_digest(tmp_path / "warm")
    assert "generation_config.json" in warm
    different = {name for name in cold.keys() | warm.keys() if cold.get(name) != warm.get(name)}
    assert different <= {"README.md", "distfinalize-manifest.json"}, different  # they name DEST
