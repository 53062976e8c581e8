"""Launch-environment detection (pure), SLURM node lists, the fault hook, and DistContext at world size 1."""

from __future__ import annotations

import pytest
import torch

from distfinalize.dist.context import DistContext
from distfinalize.dist.launch import SLURM_PORT_BASE, LaunchEnv, detect_launch, expand_nodelist, parse_fault
from distfinalize.errors import DistfinalizeError, InjectedFailure, LaunchError

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "29500"}
SRUN = {  # what srun sets in each task of a 4-task step (seen on a real SLURM 22.05)
    "SLURM_JOB_ID": "1234",
    "SLURM_STEP_ID": "0",
    "SLURM_STEPID": "0",
    "SLURM_PROCID": "2",
    "SLURM_LOCALID": "0",
    "SLURM_NTASKS": "4",
    "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
    "SLURM_STEP_NODELIST": "gpu[07-08]",
}
BATCH = {k: v for k, v in SRUN.items() if "STEP" not in k} | {"SLURM_PROCID": "0"}  # the batch script itself


def test_nothing_set_is_a_single_process() -> None:
    assert detect_launch({}) == LaunchEnv("single", 0, 1, 0)


def test_torchrun() -> None:
    launch = detect_launch(TORCHRUN)
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank) == ("torchrun", 3, 8, 1)
    assert launch.init_method is None  # torchrun's env:// (its agent's store)


def test_accelerate_launch_is_torchrun_with_accelerate_variables() -> None:
    launch = detect_launch({**TORCHRUN, "ACCELERATE_MIXED_PRECISION": "no"})
    assert launch.launcher == "accelerate" and launch.rank == 3 and launch.world_size == 8


def test_plain_srun() -> None:
    launch = detect_launch(SRUN)
    assert launch == LaunchEnv("slurm", 2, 4, 0, "gpu07", SLURM_PORT_BASE + 1234)
    assert launch.init_method == f"tcp://gpu07:{SLURM_PORT_BASE + 1234}"
    assert launch.exported() == {
        "RANK": "2",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "gpu07",
        "MASTER_PORT": str(SLURM_PORT_BASE + 1234),
    }


def test_srun_port_comes_from_the_job_id_below_the_ephemeral_range() -> None:
    port = detect_launch({**SRUN, "SLURM_JOB_ID": "987654321"}).master_port
    assert port == SLURM_PORT_BASE + 4321 and port < 32768


def test_srun_master_overrides() -> None:
    launch = detect_launch({**SRUN, "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "31000"})
    assert (launch.master_addr, launch.master_port) == ("10.0.0.5", 31000)
    assert detect_launch({**SRUN, "MASTER_ADDR": "fe80::1"}).init_method.startswith("tcp://[fe80::1]:")


def test_srun_step_tasks_win_over_job_tasks() -> None:
    """`srun -n 2` inside a 4-task allocation: the step has 2 ranks."""
    launch = detect_launch({**SRUN, "SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2"})
    assert launch.world_size == 2 and launch.rank == 1


def test_srun_step_nodelist_wins_over_job_nodelist() -> None:
    assert detect_launch({**SRUN, "SLURM_STEP_NODELIST": "gpu08"}).master_addr == "gpu08"


def test_single_task_srun_needs_no_master() -> None:
    env = {**SRUN, "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1"}
    del env["SLURM_JOB_NODELIST"], env["SLURM_STEP_NODELIST"]
    assert detect_launch(env) == LaunchEnv("slurm", 0, 1, 0)


def test_batch_script_without_srun_is_a_single_process() -> None:
    """The batch step has SLURM_PROCID=0 and SLURM_NTASKS=4 but is one process: it must not wait for 3 more."""
    assert detect_launch(BATCH) == LaunchEnv()


def test_torchrun_inside_srun_is_torchrun() -> None:
    launch = detect_launch({**SRUN, **TORCHRUN})
    assert launch.launcher == "torchrun" and launch.rank == 3 and launch.world_size == 8


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "rank 2 is not in a world of size 2"),
        ({"WORLD_SIZE": "2"}, "RANK is not set"),
        ({**SRUN, "SLURM_PROCID": "4"}, "rank 4 is not in a world of size 4"),
        ({**SRUN, "SLURM_JOB_NODELIST": "", "SLURM_STEP_NODELIST": ""}, "srun set no SLURM_JOB_NODELIST"),
        ({**SRUN, "SLURM_STEP_NODELIST": "gpu[07-"}, "cannot read the SLURM node list"),
    ],
)
def test_inconsistent_environment_is_one_clear_error(env: dict[str, str], message: str) -> None:
    with pytest.raises(LaunchError, match=message.replace("[", r"\[")):
        detect_launch(env)


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node01", ["node01"]),
        ("gpu[07-08]", ["gpu07", "gpu08"]),
        ("gpu[01-03,7]", ["gpu01", "gpu02", "gpu03", "gpu7"]),
        ("gpu[098-101]", ["gpu098", "gpu099", "gpu100", "gpu101"]),
        ("a[1-2],login-1,b3", ["a1", "a2", "login-1", "b3"]),
        ("r[1-2]-n[1-2]", ["r1-n1", "r1-n2", "r2-n1", "r2-n2"]),
        ("a[1-2]b[3-4]", ["a1b3", "a1b4", "a2b3", "a2b4"]),
        ("a[01-3],a[9-11]", ["a01", "a02", "a03", "a9", "a10", "a11"]),
        ("x[5]", ["x5"]),
    ],
)
def test_expand_nodelist(nodelist: str, hosts: list[str]) -> None:
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["", "a,,b", "a[1-", "a]1[", "a[3-1]", "a[x]", "a[[1]]", "a[1-2"])
def test_malformed_nodelist(bad: str) -> None:
    with pytest.raises(ValueError):
        expand_nodelist(bad)


def test_fault_hook_parsing() -> None:
    assert parse_fault(None) is None and parse_fault("") is None
    assert parse_fault("1:write") == (1, "write", "raise")
    assert parse_fault("0:tie check:kill") == (0, "tie check", "kill")
    for bad in ("write", "x:write", "1:", "1:write:explode"):
        with pytest.raises(LaunchError, match="RANK:STEP"):
            parse_fault(bad)


def test_world_of_one_runs_steps_without_a_process_group() -> None:
    ctx = DistContext()
    assert ctx.run_step("s", lambda: 7) == 7  # each rank its own value
    assert ctx.run_step("s", lambda: 8, ranks="rank0", share=lambda v: -v) == 8  # rank 0 keeps its whole value
    assert ctx.run_step("s", lambda: 9, collect="rank0") == [9] and ctx.run_step("s", lambda: 9, collect="all") == [9]
    assert ctx.all_gather_object("x") == ["x"] and ctx.broadcast_object("y") == "y"
    with pytest.raises(ValueError, match="boom"):
        ctx.run_step("s", lambda: (_ for _ in ()).throw(ValueError("boom")))
    ctx.close()


def test_from_env_alone_has_no_group(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_STEP_ID", "SLURM_STEPID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DISTFINALIZE_FAIL_AT", "0:write")
    ctx = DistContext.from_env("cpu", timeout_s=5)
    try:
        assert (ctx.rank, ctx.world_size, ctx.device, ctx.owns_group) == (0, 1, torch.device("cpu"), False)
        assert not torch.distributed.is_initialized()
        assert ctx.run_step("prepare", lambda: 1) == 1
        with pytest.raises(InjectedFailure, match=r"injected failure \(DISTFINALIZE_FAIL_AT=0:write\)"):
            ctx.run_step("write", lambda: 1)
    finally:
        ctx.close()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(DistfinalizeError, match="--device cuda was asked for"):
        DistContext.from_env("cuda")


@pytest.mark.parametrize(
    ("env", "shared"),
    [
        ({"LOCAL_WORLD_SIZE": "8"}, True),  # 8 ranks on a node with fewer GPUs: NCCL would refuse
        ({"LOCAL_WORLD_SIZE": "1"}, False),
        ({"SLURM_NTASKS_PER_NODE": "4(x2)"}, True),
        ({}, False),  # unknown: NCCL, as before
    ],
)
def test_ranks_sharing_a_gpu_exchange_through_the_cpu(monkeypatch, env: dict[str, str], shared: bool) -> None:
    from distfinalize.dist.group import gpus_shared

    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert gpus_shared() is shared
