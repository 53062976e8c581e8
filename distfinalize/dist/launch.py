"""Who started this process and where its peers are: pure functions of the environment."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import product

from distfinalize.errors import LaunchError

FAULT_ENV = "DISTFINALIZE_FAIL_AT"
FAULT_MODES = ("raise", "exit", "kill", "hang", "term", "int", "pause")
SLURM_PORT_BASE = 20000  # srun without MASTER_PORT: 20000 + job id % 10000, below the ephemeral port range


@dataclass(frozen=True)
class LaunchEnv:
    """Who started this process and where its peers are. `init_method` None means torchrun's env://."""

    launcher: str = "single"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None

    @property
    def init_method(self) -> str | None:
        if self.master_addr is None or self.master_port is None:
            return None
        host = f"[{self.master_addr}]" if ":" in self.master_addr else self.master_addr
        return f"tcp://{host}:{self.master_port}"

    def exported(self) -> dict[str, str]:
        """The torchrun-style variables this launch implies (exported under srun, so other code sees them)."""
        out = {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(self.local_rank)}
        if self.master_addr is not None and self.master_port is not None:
            out.update(MASTER_ADDR=self.master_addr, MASTER_PORT=str(self.master_port))
        return out


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        if default is None:
            raise LaunchError(f"{name} is not set", hint="the launcher sets it; run under torchrun or srun")
        return default
    try:
        return int(raw)
    except ValueError:
        raise LaunchError(f"{name}={raw!r} is not an integer", hint="check the launcher's environment") from None


def _torchrun(env: Mapping[str, str]) -> LaunchEnv | None:
    """torchrun / torch.distributed.run, and `accelerate launch` (which exports the same variables)."""
    if "RANK" not in env and "WORLD_SIZE" not in env:
        return None
    launcher = "accelerate" if any(k.startswith("ACCELERATE_") for k in env) else "torchrun"
    return LaunchEnv(launcher, _int(env, "RANK"), _int(env, "WORLD_SIZE"), _int(env, "LOCAL_RANK", 0))


def _slurm(env: Mapping[str, str]) -> LaunchEnv | None:
    """One srun task per rank. Only inside a job step: a batch script also has SLURM_PROCID=0, but no step."""
    if "SLURM_PROCID" not in env or not (env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID")):
        return None
    world = _int(env, "SLURM_STEP_NUM_TASKS") if env.get("SLURM_STEP_NUM_TASKS") else _int(env, "SLURM_NTASKS", 1)
    launch = LaunchEnv("slurm", _int(env, "SLURM_PROCID"), world, _int(env, "SLURM_LOCALID", 0))
    if world == 1:
        return launch
    addr = env.get("MASTER_ADDR") or slurm_head_node(env)
    port = SLURM_PORT_BASE + _int(env, "SLURM_JOB_ID", 0) % 10000
    if env.get("MASTER_PORT"):
        port = _int(env, "MASTER_PORT")
    return LaunchEnv("slurm", launch.rank, world, launch.local_rank, addr, port)


LAUNCHERS: dict[str, Callable[[Mapping[str, str]], LaunchEnv | None]] = {"torchrun": _torchrun, "slurm": _slurm}


def detect_launch(env: Mapping[str, str] | None = None) -> LaunchEnv:
    """The first launcher of LAUNCHERS that recognizes `env` (default: os.environ), else a single process."""
    env = os.environ if env is None else env
    for detect in LAUNCHERS.values():
        launch = detect(env)
        if launch is not None:
            break
    else:
        return LaunchEnv()
    if launch.world_size < 1 or not 0 <= launch.rank < launch.world_size:
        raise LaunchError(
            f"rank {launch.rank} is not in a world of size {launch.world_size} ({launch.launcher})",
            hint="check RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS",
        )
    if launch.local_rank < 0:
        raise LaunchError(f"local rank {launch.local_rank} is negative ({launch.launcher})")
    return launch


def slurm_head_node(env: Mapping[str, str]) -> str:
    """The first host of the step's (else the job's) node list, like `scontrol show hostnames | head -1`."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise LaunchError("srun set no SLURM_JOB_NODELIST", hint="set MASTER_ADDR to the host of rank 0")
    try:
        return expand_nodelist(nodelist)[0]
    except ValueError:
        hosts = _scontrol_hostnames(nodelist)
        if not hosts:
            raise LaunchError(
                "cannot read the SLURM node list", where=nodelist, hint="set MASTER_ADDR to the host of rank 0"
            ) from None
        return hosts[0]


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand SLURM's hostlist syntax: "gpu[01-03,7],login-1,r[1-2]-n[1-2]" -> every host name, in order.

    Ranges keep their zero padding ("01-03" -> 01 02 03). Raises ValueError on malformed input.
    """
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        parts = re.split(r"(\[[^\[\]]*\])", item)
        choices: list[list[str]] = []
        for part in parts:
            if part.startswith("["):
                choices.append(_expand_ranges(part[1:-1]))
            elif "[" in part or "]" in part:
                raise ValueError(f"unbalanced brackets in {item!r}")
            elif part:
                choices.append([part])
        if not choices:
            raise ValueError(f"empty host in {nodelist!r}")
        hosts += ["".join(p) for p in product(*choices)]
    return hosts


def _split_top_level(text: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth not in (0, 1):
            raise ValueError(f"nested or unbalanced brackets in {text!r}")
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced brackets in {text!r}")
    items.append(text[start:])
    if any(not item for item in items):
        raise ValueError(f"empty host in {text!r}")
    return items


def _expand_ranges(spec: str) -> list[str]:
    out: list[str] = []
    for piece in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", piece.strip())
        if match is None:
            raise ValueError(f"bad range {piece!r}")
        lo, hi = match.group(1), match.group(2) or match.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"descending range {piece!r}")
        out += [str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1)]
    return out


def _scontrol_hostnames(nodelist: str) -> list[str]:
    if shutil.which("scontrol") is None:
        return []
    try:
        done = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return done.stdout.split()


def parse_fault(spec: str | None) -> tuple[int, str, str] | None:
    """DISTFINALIZE_FAIL_AT="RANK:STEP[:MODE]" -> (rank, step, mode). Testing hook; see the module docstring."""
    if not spec:
        return None
    rank, _, rest = spec.partition(":")
    step, _, mode = rest.partition(":")
    mode = mode or "raise"
    if not rank.strip().isdigit() or not step or mode not in FAULT_MODES:
        raise LaunchError(
            f"{FAULT_ENV}={spec!r} is not RANK:STEP[:MODE]", hint=f"MODE is one of {', '.join(FAULT_MODES)}"
        )
    return int(rank), step, mode
