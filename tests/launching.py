"""Helpers of the launch tests (tests/multirank/test_launch.py, tests/slurm/): clean environments, free ports,
waiting on several processes, and the torchrun reference output every launcher must reproduce byte for byte."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
from support import TIMEOUT_S, check_ok, env, finalize, output_digest

VARIANT = "untied-optim"  # model + optimizer state (the optimizer is skipped)
ARGS = ("--max-shard-size", "100KB")  # several output files, so that every rank writes
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")
_references: dict[Path, dict[str, str]] = {}


def bare_env(**extra: str) -> dict[str, str]:
    """support.env() without anything a launcher would have set (pytest itself may run inside one)."""
    out = {
        k: v
        for k, v in env().items()
        if k not in LAUNCHER_VARS and not k.startswith(("SLURM_", "TORCHELASTIC_", "ACCELERATE_", "PET_"))
    }
    out.pop("DISTFINALIZE_FAIL_AT", None)
    return out | extra


def free_port(low: int = 20000, high: int = 30000) -> int:
    """A port in [low, high) that nothing listens on now."""
    span = high - low
    for i in range(span):
        port = low + (os.getpid() + i) % span
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in [{low}, {high})")


def wait_all(procs: list[subprocess.Popen], timeout: float = TIMEOUT_S) -> list[tuple[int, str, str]]:
    """(exit code, stdout, stderr) of every process; kills the rest when one outlives `timeout`."""
    start, out = time.monotonic(), []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=max(1.0, timeout - (time.monotonic() - start)))
            out.append((proc.returncode, stdout, stderr))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return out


def reference_digest(src: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """output_digest of what a plain 2-rank torchrun run writes from `src` (once per session and source).

    DEST's basename appears in the model card, so every run compared with it writes to a dir named `model`.
    """
    if src not in _references:
        dest = tmp_path_factory.mktemp("reference") / "model"
        check_ok(finalize(src, dest, *ARGS, nproc=2))
        _references[src] = output_digest(dest)
    return _references[src]


def assert_nothing_written(dest: Path) -> None:
    """No DEST, and nothing else (no staging dir) beside where it would have been."""
    assert not dest.exists(), "DEST appeared after a failed run"
    assert list(dest.parent.iterdir()) == [], f"left behind: {list(dest.parent.iterdir())}"
