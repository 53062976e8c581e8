"""Two runs never share a staging dir: rank 0 holds an exclusive lock on it for the whole run (real processes)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from launching import bare_env
from support import REPO, TIMEOUT_S
from trust_runs import ARGS, kill_tree, one_error_line, staging_of, start

pytestmark = pytest.mark.dist

SRC = "untied-model"


def finalize_alone(src: Path, dest: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "distfinalize", str(src), str(dest), *ARGS, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=bare_env(), cwd=REPO, timeout=TIMEOUT_S, check=False)


def test_second_run_is_refused_while_the_first_writes(fsdp2_runs: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    first = start(fsdp2_runs / SRC, dest, *ARGS, fail_at="1:write:hang", log=tmp_path / "log")
    try:
        first.wait_for("rank 1 fails at 'write' (hang)")
        holder = f"(pid {first.worker(0)} on host {socket.gethostname()})"
        for extra in ((), ("--resume",)):
            second = finalize_alone(fsdp2_runs / SRC, dest, *extra)
            assert second.returncode == 1, second.stderr
            line = one_error_line(second.stderr)
            assert f"another distfinalize run is writing to: {staging_of(dest)} {holder}" in line, line
        assert first.proc.poll() is None and staging_of(dest).is_dir()  # the live run was not disturbed
    finally:
        kill_tree(first.proc.pid)
        first.proc.wait()
    # its owner is gone, so is the lock: --resume takes the staging dir over and reuses rank 0's files
    resumed = finalize_alone(fsdp2_runs / SRC, dest, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    # rank 0's 4 whole files (its piece of the 5th is cut for 2 ranks, so a single process writes that file anew)
    assert resumed.stderr.count("resume: reusing") == 4 and dest.is_dir() and not staging_of(dest).exists()
