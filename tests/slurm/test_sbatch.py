"""The project's own slurm/ scripts, submitted to a real SLURM (tests/slurm/conftest.py starts one on this
machine): each must write the same files, byte for byte, as a 2-rank torchrun run on the same checkpoint, and a
job with a failing rank must exit non-zero and leave no DEST. Marked `slurm`; skipped, with the reason, where
SLURM is not installed."""

from __future__ import annotations

from pathlib import Path

import pytest
from launching import ARGS, VARIANT, assert_nothing_written, reference_digest
from support import REPO, output_digest

from distfinalize.dist.launch import expand_nodelist

pytestmark = pytest.mark.slurm

SCRIPTS = REPO / "slurm"
ON_THIS_MACHINE = ("--cpus-per-task=1",)  # the scripts ask for more; a test node has a few cores


@pytest.fixture(scope="module")
def reference(fsdp2_runs: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return reference_digest(fsdp2_runs / VARIANT, tmp_path_factory)


def test_nodelist_parser_agrees_with_scontrol(slurm) -> None:
    """dist.expand_nodelist (used by plain srun ranks) against `scontrol show hostnames`."""
    for nodelist in ("gpu[01-03,7],login-1", "r[1-2]-n[08-10]", "a[1-2]b[3-4]", "a[01-3]", "a[9-11]", slurm.node):
        assert expand_nodelist(nodelist) == slurm.scontrol("show", "hostnames", nodelist).split(), nodelist


def test_cpu_script_plain_srun(slurm, fsdp2_runs: Path, tmp_path: Path, reference: dict[str, str]) -> None:
    """slurm/finalize-cpu.sbatch with 2 tasks: srun starts 2 ranks, no torchrun."""
    dest = tmp_path / "model"
    options = ("--ntasks=2", *ON_THIS_MACHINE)
    code, log = slurm.sbatch(
        SCRIPTS / "finalize-cpu.sbatch", fsdp2_runs / VARIANT, dest, *ARGS, "--log-level", "debug", options=options
    )
    assert code == 0, log
    for rank in (0, 1):
        assert f"[rank{rank}] DEBUG launched by slurm: rank {rank} of 2" in log, log
    assert output_digest(dest) == reference


def test_multinode_script_two_agents(slurm, fsdp2_runs: Path, tmp_path: Path, reference: dict[str, str]) -> None:
    """slurm/finalize-multinode.sbatch on one node with 2 tasks: srun starts 2 torchrun agents (one rank each)
    that meet in a c10d rendezvous on the head node from `scontrol show hostnames`."""
    dest = tmp_path / "model"
    options = ("--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", *ON_THIS_MACHINE)
    code, log = slurm.sbatch(
        SCRIPTS / "finalize-multinode.sbatch",
        fsdp2_runs / VARIANT,
        dest,
        *ARGS,
        "--log-level",
        "debug",
        options=options,
        NPROC_PER_NODE="1",
    )
    assert code == 0, log
    assert f"2 agent(s) x 1 rank(s), rendezvous {slurm.node}:" in log, log
    for rank in (0, 1):
        assert f"[rank{rank}] DEBUG launched by torchrun: rank {rank} of 2" in log, log
    assert output_digest(dest) == reference


def test_failing_rank_fails_the_job(slurm, fsdp2_runs: Path, tmp_path: Path) -> None:
    """slurm/finalize.sbatch (torchrun, 2 ranks on the CPU): rank 1 fails in its write. The job exits non-zero,
    its log names rank 1 and the step, and neither DEST nor a staging dir is left."""
    dest = tmp_path / "out" / "model"
    dest.parent.mkdir()
    options = ("--gpus-per-node=0", *ON_THIS_MACHINE)
    code, log = slurm.sbatch(
        SCRIPTS / "finalize.sbatch",
        fsdp2_runs / VARIANT,
        dest,
        *ARGS,
        options=options,
        NPROC_PER_NODE="2",
        DISTFINALIZE_FAIL_AT="1:write",
    )
    assert code != 0, log
    lines = [line for line in log.splitlines() if "distfinalize: error:" in line]
    assert len(lines) == 1, log  # one line for the job, from rank 0
    assert "[rank0] distfinalize: error: rank 1 failed during write: injected failure" in lines[0], log
    assert "failed (exit 1); the rank lines above say which rank and step" in log, log
    assert_nothing_written(dest)
