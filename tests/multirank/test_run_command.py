"""`distfinalize run`: the command that starts the ranks itself (torch.distributed's elastic agent). Its output is
a 2-rank torchrun run's, byte for byte; one node or two meeting at a rendezvous endpoint; a failure is one error
line and an exit code, with no launcher traceback or failure table. Marked `dist`: real processes, real gloo."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from launching import ARGS, VARIANT, assert_nothing_written, bare_env, free_port, reference_digest, wait_all
from support import TIMEOUT_S, error_lines, output_digest

pytestmark = pytest.mark.dist

OUR_LINE = re.compile(
    r"^(\d\d:\d\d:\d\d \[rank\d+\] (DEBUG|INFO|WARNING|ERROR) \S|(\[rank\d+\] )?distfinalize: error: )"
)


@pytest.fixture(scope="module")
def reference(fsdp2_runs: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return reference_digest(fsdp2_runs / VARIANT, tmp_path_factory)


def run_command(*args: str | os.PathLike, **extra_env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "distfinalize", "run", *map(str, args)]
    return subprocess.run(
        cmd, capture_output=True, text=True, env=bare_env(**extra_env), timeout=TIMEOUT_S, check=False
    )


def foreign_lines(result: subprocess.CompletedProcess) -> list[str]:
    """Lines that distfinalize did not print (a launcher's logging, a traceback, a failure table)."""
    return [line for line in (result.stdout + result.stderr).splitlines() if line.strip() and not OUR_LINE.match(line)]


def test_run_two_ranks_writes_torchruns_output(fsdp2_runs: Path, tmp_path: Path, reference: dict[str, str]) -> None:
    dest = tmp_path / "model"
    result = run_command("--nproc-per-node", "2", fsdp2_runs / VARIANT, dest, *ARGS)
    assert result.returncode == 0, result.stderr
    assert output_digest(dest) == reference
    assert foreign_lines(result) == []
    assert "[rank0] INFO wrote" in result.stderr and "[rank1] INFO" not in result.stderr


def test_run_two_nodes_meet_at_the_endpoint(fsdp2_runs: Path, tmp_path: Path, reference: dict[str, str]) -> None:
    """The same command on two "nodes" (two agents on 127.0.0.1), one rank each: one job, the same output."""
    dest = tmp_path / "model"
    cmd = [sys.executable, "-m", "distfinalize", "run", "--nnodes", "2", "--nproc-per-node", "1"]
    cmd += ["--rdzv-endpoint", f"127.0.0.1:{free_port(30000, 32000)}", "--rdzv-id", f"test-{os.getpid()}"]
    cmd += [str(fsdp2_runs / VARIANT), str(dest), *ARGS]
    agents = [
        subprocess.Popen(cmd, env=bare_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = wait_all(agents)
    assert [code for code, _, _ in results] == [0, 0], [err for _, _, err in results]
    assert output_digest(dest) == reference


def test_run_failure_is_one_line_and_its_exit_code(tmp_path: Path) -> None:
    dest = tmp_path / "out" / "model"
    dest.parent.mkdir()
    result = run_command("--nproc-per-node", "2", tmp_path / "missing", dest)
    assert result.returncode == 1
    assert len(error_lines(result.stderr)) == 1 and "source does not exist" in result.stderr
    assert foreign_lines(result) == []
    assert_nothing_written(dest)


def test_run_rank_killed_is_one_line(fsdp2_runs: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out" / "model"
    dest.parent.mkdir()
    fail = {"DISTFINALIZE_FAIL_AT": "1:write:kill"}
    result = run_command("--nproc-per-node", "2", fsdp2_runs / VARIANT, dest, *ARGS, **fail)
    assert result.returncode == 1
    assert error_lines(result.stderr) == [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error_lines(result.stderr)) == 1 and "rank 1 failed during write" in result.stderr
    assert foreign_lines(result) == []
    assert not dest.exists()  # the staging dir stays, for --resume
