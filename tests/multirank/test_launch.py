"""Launch anywhere: plain srun-style ranks, two torchrun agents (multi-node on one machine), accelerate launch,
a single process with no launcher at all; and what happens when one rank raises, dies or hangs.

Every run finalizes the same FSDP2 checkpoint; a successful run must write the same files, byte for byte, as a
2-rank torchrun run. Marked `dist`: real processes, real gloo. Failures are injected with the documented
testing hook DISTFINALIZE_FAIL_AT="RANK:STEP[:MODE]" (distfinalize/dist.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from launching import ARGS, VARIANT, assert_nothing_written, bare_env, free_port, reference_digest, wait_all
from support import REPO, TIMEOUT_S, error_lines, finished_text, our_traceback, output_digest

pytestmark = pytest.mark.dist

LAUNCH = REPO / "launch"


def srun_ranks(n: int, *args: str | os.PathLike, fail_at: str | None = None) -> list[subprocess.Popen]:
    """Start `python -m distfinalize ARGS` n times with the variables srun gives each task, and no torchrun.

    The job id is chosen so that the default port (20000 + job id % 10000) is free.
    """
    job_id = free_port() - 20000 + 70000
    procs = []
    for rank in range(n):
        task_env = bare_env(
            SLURM_JOB_ID=str(job_id),
            SLURM_STEP_ID="0",
            SLURM_STEPID="0",
            SLURM_PROCID=str(rank),
            SLURM_LOCALID=str(rank),
            SLURM_NODEID="0",
            SLURM_NTASKS=str(n),
            SLURM_STEP_NUM_TASKS=str(n),
            SLURM_JOB_NODELIST="localhost",
            SLURM_STEP_NODELIST="localhost",
        )
        if fail_at is not None:
            task_env["DISTFINALIZE_FAIL_AT"] = fail_at
        cmd = [sys.executable, "-m", "distfinalize", *map(str, args)]
        procs.append(subprocess.Popen(cmd, env=task_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


@pytest.fixture(scope="module")
def reference(fsdp2_runs: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return reference_digest(fsdp2_runs / VARIANT, tmp_path_factory)


@pytest.fixture(scope="module")
def srun_raised(fsdp2_runs: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    """3 srun-style ranks; rank 1 raises at the start of its write."""
    dest = tmp_path_factory.mktemp("srun-raise") / "model"
    return dest, wait_all(srun_ranks(3, fsdp2_runs / VARIANT, dest, *ARGS, fail_at="1:write"))


@pytest.fixture(scope="module")
def srun_rank0_killed(fsdp2_runs: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    """2 srun-style ranks; rank 0 (which also hosts the store) is SIGKILLed at the start of its write."""
    dest = tmp_path_factory.mktemp("srun-kill") / "model"
    return dest, wait_all(srun_ranks(2, fsdp2_runs / VARIANT, dest, *ARGS, fail_at="0:write:kill"))


def test_plain_srun_without_torchrun(fsdp2_runs: Path, tmp_path: Path, reference: dict[str, str]) -> None:
    """srun's SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, master from the node list, port from the job id;
    3 ranks (the checkpoint was saved by 2)."""
    dest = tmp_path / "model"
    results = wait_all(srun_ranks(3, fsdp2_runs / VARIANT, dest, *ARGS, "--log-level", "debug"))
    for rank, (code, _, err) in enumerate(results):
        assert code == 0, f"rank {rank} exited {code}:\n{err}"
        assert f"[rank{rank}] DEBUG launched by slurm: rank {rank} of 3" in err
    assert output_digest(dest) == reference


def test_srun_rank_raises_every_rank_stops(srun_raised: tuple[Path, list]) -> None:
    """Every rank exits 1; rank 0 prints one line naming rank 1, the step and rank 1's error; the staging dir
    is removed and DEST never appears."""
    dest, results = srun_raised
    assert [code for code, _, _ in results] == [1, 1, 1], [err for _, _, err in results]
    lines = error_lines(results[0][2])
    assert len(lines) == 1, results[0][2]
    assert "rank 1 failed during write: injected failure (DISTFINALIZE_FAIL_AT=1:write)" in lines[0]
    assert not any(our_traceback(err) for _, _, err in results)
    assert_nothing_written(dest)


def test_srun_rank0_dies_rank1_names_it(srun_rank0_killed: tuple[Path, list]) -> None:
    """Rank 0 dies mid-run: rank 1 sees the connection (and the store) go, exits 1 and names rank 0 and the step.
    DEST does not appear (the staging dir stays behind: its owner, rank 0, is gone; --resume can use it)."""
    dest, results = srun_rank0_killed
    assert [code for code, _, _ in results] == [-9, 1], results[1][2]
    lines = error_lines(results[1][2])
    assert len(lines) == 1, results[1][2]
    assert "rank 0 failed during write: it died or stopped responding" in lines[0]
    assert not our_traceback(results[1][2])
    assert not dest.exists()


def test_srun_one_error_line_from_the_right_rank(
    srun_raised: tuple[Path, list], srun_rank0_killed: tuple[Path, list]
) -> None:
    _, raised = srun_raised
    assert [len(error_lines(err)) for _, _, err in raised] == [1, 0, 0], [err for _, _, err in raised]
    assert error_lines(raised[0][2])[0].startswith("[rank0] ")
    _, killed = srun_rank0_killed
    assert error_lines(killed[1][2])[0].startswith("[rank1] "), killed[1][2]


def test_launch_script_hung_rank_others_stop_within_the_timeout(fsdp2_runs: Path, tmp_path: Path) -> None:
    """launch/finalize.sh (distfinalize run), 2 ranks: rank 1 hangs in its write. Rank 0 gives up after --timeout,
    names rank 1, keeps its own finished files for --resume, the agent stops rank 1 and the run exits non-zero.
    With --local-ranks-filter 0 only rank 0 reaches the console, and --log-dir keeps every rank's output in files."""
    dest, logs = tmp_path / "out" / "model", tmp_path / "logs"
    dest.parent.mkdir()
    timeout_s = 5
    cmd = ["bash", LAUNCH / "finalize.sh", "--nproc", "2", "--log-dir", logs, "--local-ranks-filter", "0"]
    cmd += [fsdp2_runs / VARIANT, dest, *ARGS, "--timeout", str(timeout_s)]
    run_env = bare_env(PYTHON=sys.executable, DISTFINALIZE_FAIL_AT="1:write:hang")
    result = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, env=run_env, timeout=TIMEOUT_S)
    assert result.returncode != 0
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr  # the agent prefixes the lines it tees with "[default0]:"
    assert (
        "[rank0] distfinalize: error: rank 1 failed during write: it died or stopped responding (Timed out"
        in (lines[0])
    )
    assert "[rank1]" not in result.stderr and "[default1]" not in result.stderr  # filtered from the console...
    rank_logs = {p.parent.name: p.read_text() for p in logs.rglob("stderr.log")}
    assert "fails at 'write' (hang)" in rank_logs["1"]  # ...but in its log file
    assert "rank 1 failed during write" in rank_logs["0"]
    # a hung rank is a failure --resume can get past: rank 0's finished files stay in the staging dir, and the
    # line says how many --resume will reuse
    staging = dest.with_name(dest.name + ".distfinalize-staging")
    assert not dest.exists() and list((staging / ".progress").glob("*.json"))
    assert f"--resume will reuse the {finished_text(staging)} kept in {staging}" in lines[0], lines[0]


def test_launch_scripts_two_agents_c10d_rendezvous(fsdp2_runs: Path, tmp_path: Path, reference: dict[str, str]) -> None:
    """launch/finalize-multinode.sh twice on 127.0.0.1 (--nnodes 2, one rank each): one job, same output."""
    dest = tmp_path / "model"
    cmd = ["bash", str(LAUNCH / "finalize-multinode.sh"), "--nnodes", "2", "--nproc", "1", "--rdzv-endpoint"]
    cmd += [f"127.0.0.1:{free_port(30000, 32000)}", "--job-id", f"test-{os.getpid()}"]
    cmd += [str(fsdp2_runs / VARIANT), str(dest), *ARGS, "--log-level", "debug"]
    run_env = bare_env(PYTHON=sys.executable)
    agents = [
        subprocess.Popen(cmd, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    results = wait_all(agents)
    assert [code for code, _, _ in results] == [0, 0], [err for _, _, err in results]
    both = "".join(err for _, _, err in results)
    for rank in (0, 1):
        assert f"[rank{rank}] DEBUG launched by torchrun: rank {rank} of 2" in both
    assert output_digest(dest) == reference


def test_accelerate_launch(fsdp2_runs: Path, tmp_path: Path, reference: dict[str, str]) -> None:
    """`accelerate launch --multi_gpu --num_processes 2 -m distfinalize` on CPU: accelerate's torchrun launcher.
    (Its `--cpu` mode starts one process unless mpirun is set up, so it is not a multi-process path.)"""
    dest = tmp_path / "model"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port"]
    cmd += [str(free_port(32000, 32700)), "-m", "distfinalize", str(fsdp2_runs / VARIANT), str(dest), *ARGS]
    cmd += ["--log-level", "debug"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=bare_env(), timeout=TIMEOUT_S, check=False)
    assert result.returncode == 0, result.stderr
    assert "[rank1] DEBUG launched by accelerate: rank 1 of 2" in result.stderr
    assert output_digest(dest) == reference


def test_single_process_with_no_environment(fsdp2_runs: Path, tmp_path: Path, reference: dict[str, str]) -> None:
    """No launcher variables at all (PATH, HOME, the repo on PYTHONPATH): world size 1, no process group."""
    dest = tmp_path / "model"
    minimal = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    minimal |= {k: v for k, v in os.environ.items() if k == "HOME" or k.startswith("HF_")}
    cmd = [sys.executable, "-m", "distfinalize", str(fsdp2_runs / VARIANT), str(dest), *ARGS, "--log-level", "debug"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=minimal, timeout=TIMEOUT_S, check=False)
    assert result.returncode == 0, result.stderr
    assert "DEBUG launched by single: rank 0 of 1" in result.stderr and "[rank" not in result.stderr
    assert output_digest(dest) == reference
