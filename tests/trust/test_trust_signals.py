"""Signals and early failures, for real: SIGTERM/SIGINT sent to a real torchrun job, a worker SIGKILLed, a rank that
fails before the process group forms, a source file the user may not read. Each gives one line that says what
happened, from the right rank, and no traceback."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from launching import bare_env, free_port, wait_all
from support import error_lines, finished_text, our_traceback, run_as_nobody
from trust_runs import ARGS, finished_records, one_error_line, run, staging_of, start

pytestmark = pytest.mark.dist

SRC = "untied-model"
RANK0_FILES = 5  # of the 10 files at 60KB, rank 0 writes 4 and its piece of the 5th: 5 progress records


def wait_until(predicate, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_write_one_line_for_the_job(fsdp2_runs: Path, tmp_path: Path, sig: signal.Signals) -> None:
    """Rank 1 is stuck at its write, rank 0 finished its files and waits: the signal goes to torchrun, which
    passes it to every worker. One line for the job (rank 0), the staging dir kept with the count --resume reuses;
    then --resume finishes the job from those files."""
    dest = tmp_path / "out"
    job = start(fsdp2_runs / SRC, dest, *ARGS, fail_at="1:write:hang", log=tmp_path / "log")
    job.wait_for("rank 1 fails at 'write' (hang)")
    wait_until(lambda: finished_records(dest) >= RANK0_FILES, "rank 0's files")
    job.proc.send_signal(sig)
    code, out = job.finish(timeout=120)
    assert code != 0 and not dest.exists(), out
    line = one_error_line(out)
    assert line.startswith("[rank0] "), line
    assert f"interrupted by {sig.name} during write: nothing was written to DEST" in line, line
    assert f"--resume will reuse the {finished_text(staging_of(dest))} kept in {staging_of(dest)}" in line, line
    assert "4 finished file(s) and 1 finished piece(s) of shared files" in line, line
    assert finished_records(dest) == RANK0_FILES
    assert "KeyboardInterrupt" not in out and not our_traceback(out), out
    if sig == signal.SIGTERM:
        code, out = run(fsdp2_runs / SRC, dest, *ARGS, "--resume", log=tmp_path / "resume.log")
        assert code == 0, out
        assert out.count("resume: reusing") == RANK0_FILES and dest.is_dir() and not staging_of(dest).exists()


def test_sigkilled_rank_is_named_not_interrupted(fsdp2_runs: Path, tmp_path: Path) -> None:
    """Rank 0 is busy (not in a collective) when rank 1 is SIGKILLed; torchrun then sends rank 0 SIGTERM. Rank 0
    must name rank 1 as dead, not report a mere interruption."""
    dest = tmp_path / "out"
    job = start(fsdp2_runs / SRC, dest, *ARGS, fail_at="0:write:hang", log=tmp_path / "log")
    job.wait_for("rank 0 fails at 'write' (hang)")
    wait_until(lambda: finished_records(dest) >= 10 - RANK0_FILES, "rank 1's files")  # rank 1 waits in the step
    os.kill(job.worker(1), signal.SIGKILL)
    code, out = job.finish(timeout=120)
    assert code != 0 and not dest.exists(), out
    line = one_error_line(out)
    assert line.startswith("[rank0] ") and "rank 1 failed during write: it died" in line, line
    assert "interrupted" not in line, line
    assert f"--resume will reuse the {finished_text(staging_of(dest))} kept" in line, line
    assert "5 finished file(s) and 1 finished piece(s)" in line and not our_traceback(out), line


def test_sigint_in_the_shutdown_barrier_no_traceback(fsdp2_runs: Path, tmp_path: Path) -> None:
    """DEST is committed; rank 1 is stuck on its way out while rank 0 waits in the teardown barrier; Ctrl-C (SIGINT
    to torchrun, passed to the workers) must end it without a KeyboardInterrupt traceback or a false failure."""
    dest = tmp_path / "out"
    job = start(fsdp2_runs / SRC, dest, *ARGS, fail_at="1:close:hang", log=tmp_path / "log")
    job.wait_for("rank 1 fails at 'close' (hang)")
    job.proc.send_signal(signal.SIGINT)
    _, out = job.finish(timeout=120)
    assert dest.is_dir() and "finalized" in out, out
    assert "KeyboardInterrupt" not in out, out  # (torchrun prints its own SignalException traceback)
    assert not our_traceback(out) and error_lines(out) == [] and "nothing was written" not in out, out


def test_rank_failing_before_the_group_forms_says_why_under_torchrun(tmp_path: Path) -> None:
    """Only rank 1 fails, before any process group exists: its own line, rank-prefixed; the job ends (torchrun
    stops rank 0, which waits to form the group)."""
    code, out = run(
        tmp_path / "no-such-src", tmp_path / "out", "--timeout", "10", fail_at="1:startup", log=tmp_path / "log"
    )
    assert code != 0, out
    lines = error_lines(out)
    assert "[rank1] distfinalize: error: injected failure (DISTFINALIZE_FAIL_AT=1:startup)" in lines[0], out
    assert len(lines) == 1 and not our_traceback(out), out


def test_rank_failing_before_the_group_forms_says_why_under_srun(tmp_path: Path) -> None:
    """Plain srun-style ranks (nobody stops rank 0): rank 1 says why it failed; rank 0 gives up after --timeout
    and says it could not form the group. Each prints its own line; neither a traceback."""
    job_id = free_port() - 20000 + 70000
    procs = []
    for rank in range(2):
        task_env = bare_env(
            SLURM_JOB_ID=str(job_id),
            SLURM_STEP_ID="0",
            SLURM_PROCID=str(rank),
            SLURM_LOCALID=str(rank),
            SLURM_NTASKS="2",
            SLURM_STEP_NUM_TASKS="2",
            SLURM_JOB_NODELIST="localhost",
            DISTFINALIZE_FAIL_AT="1:startup",
        )
        cmd = [sys.executable, "-m", "distfinalize", str(tmp_path / "src"), str(tmp_path / "out"), "--timeout", "5"]
        procs.append(subprocess.Popen(cmd, env=task_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    (code0, _, err0), (code1, _, err1) = wait_all(procs, timeout=120)
    assert code1 == 1 and error_lines(err1) == [
        "[rank1] distfinalize: error: injected failure (DISTFINALIZE_FAIL_AT=1:startup). a testing hook; unset it"
    ], err1
    assert code0 == 1 and len(error_lines(err0)) == 1, err0
    assert "[rank0] distfinalize: error: rank 0 of 2 cannot join the process group" in error_lines(err0)[0], err0
    assert not our_traceback(err0 + err1)


def test_unreadable_checkpoint_file_is_a_permission_error(fsdp2_runs: Path) -> None:
    """A .distcp file the user may not read (a real permission check, run as `nobody`) is not "corrupt"."""
    base = Path(tempfile.mkdtemp(prefix="distfinalize-perm-"))
    try:
        base.chmod(0o777)
        src = base / "run"
        shutil.copytree(fsdp2_runs / SRC, src)
        data = max(src.rglob("*.distcp"), key=lambda p: p.stat().st_size)
        data.chmod(0o600)  # root's; the folder and .metadata stay readable
        result = run_as_nobody(base, str(src), str(base / "out"))
        assert result.returncode == 1, result.stderr
        line = one_error_line(result.stderr)
        assert "permission denied" in line and data.name in line and "corrupt" not in line, line
        assert not our_traceback(result.stderr) and not (base / "out").exists()
    finally:
        shutil.rmtree(base)
