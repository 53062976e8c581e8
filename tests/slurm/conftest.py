"""A real SLURM for the tests: munged, slurmctld and slurmd started on this machine for the session, and stopped
by PID afterwards. Everything (munge key and socket, slurm.conf, state, spool, logs) lives in one temp dir; the
system's own SLURM or munge configuration is neither read nor changed.

Skipped, with the reason, where sbatch is not installed (`.ci/run` installs it) or the daemons cannot be started
(they need root). A daemon that is installed but does not come up is an error, not a skip.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from launching import bare_env, free_port

INSTALL = "apt-get install slurmctld slurmd slurm-client munge (.ci/run does)"
JOB_LIMIT_S = 600


@dataclass
class Slurm:
    """A running one-node cluster: `node` (its name, as in SLURM_JOB_NODELIST), and how to submit to it."""

    root: Path
    conf: Path
    node: str

    def env(self, **extra: str) -> dict[str, str]:
        """The environment for sbatch/scontrol (the job inherits it: sbatch --export=ALL is the default)."""
        return bare_env(SLURM_CONF=str(self.conf), PYTHON=sys.executable, **extra)

    def sbatch(
        self, script: Path, *args: str | os.PathLike, options: tuple[str, ...] = (), **env: str
    ) -> tuple[int, str]:
        """Submit SCRIPT ARGS and wait for the job: (its exit code, its log). Polls scontrol every 0.5 s
        (`sbatch --wait` backs off to 30 s between polls, which doubles the time these tests take)."""
        log = Path(tempfile.mkdtemp(prefix="job-", dir=self.root)) / "job.out"
        cmd = ["sbatch", "--parsable", f"--output={log}", f"--chdir={log.parent}", "--time=10", *options]
        done = subprocess.run(
            [*cmd, str(script), *map(str, args)], capture_output=True, text=True, env=self.env(**env), timeout=60
        )
        if done.returncode != 0:
            return done.returncode, f"sbatch failed: {done.stdout}{done.stderr}"
        job_id = done.stdout.strip().split(";")[0]
        deadline = time.monotonic() + JOB_LIMIT_S
        while True:
            info = self.scontrol("show", "job", "-o", job_id)
            state = re.search(r"JobState=(\S+)", info)
            if state is not None and state.group(1) not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
                break
            if time.monotonic() > deadline:
                subprocess.run(["scancel", job_id], env=self.env(), check=False)
                raise TimeoutError(f"job {job_id} still {state and state.group(1)} after {JOB_LIMIT_S}s")
            time.sleep(0.5)
        code, sig = map(int, re.search(r"ExitCode=(\d+):(\d+)", info).groups())
        text = log.read_text() if log.exists() else "(no job log)"
        return code or (128 + sig if sig else 0), f"{text}\n[job {job_id}: {state.group(1)}, ExitCode={code}:{sig}]"

    def scontrol(self, *args: str) -> str:
        return subprocess.run(
            ["scontrol", *args], capture_output=True, text=True, env=self.env(), check=True, timeout=30
        ).stdout


def _why_not() -> str | None:
    """Why this machine cannot start a SLURM for the tests, or None."""
    if shutil.which("sbatch") is None:
        return f"sbatch is not installed: {INSTALL}"
    missing = [d for d in ("slurmctld", "slurmd", "munged", "munge", "scontrol") if not _which(d)]
    if missing:
        return f"{', '.join(missing)} not installed: {INSTALL}"
    if os.geteuid() != 0:
        return "starting slurmd and munged needs root"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "there is no munge user (the munge package creates it)"
    return None


def _die_with_parent() -> None:
    """In the daemon's child process, before exec: SIGTERM when pytest dies, even by SIGKILL (Linux prctl
    PR_SET_PDEATHSIG), so a killed test run leaves no SLURM daemons behind."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")


def _node_name() -> str:
    """This host's short name when it resolves (so jobs see a real node name), else localhost."""
    name = socket.gethostname().split(".")[0]
    try:
        socket.gethostbyname(name)
    except OSError:
        return "localhost"
    return name


def _wait(what: str, ready, logs: list[Path], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.3)
    tails = "\n".join(f"--- {p}:\n{p.read_text()[-2000:]}" for p in logs if p.exists())
    raise RuntimeError(f"{what} did not come up within {timeout:.0f}s\n{tails}")


def _conf(root: Path, node: str, socket_path: Path) -> str:
    cpus = max(os.cpu_count() or 1, 4)  # config_overrides: jobs may ask for more CPUs than the machine has
    ctld_port, slurmd_port = free_port(16000, 16500), free_port(16500, 17000)
    return f"""\
ClusterName=distfinalize-test
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket_path}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
KillWait=10
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


@pytest.fixture(scope="session")
def slurm() -> Iterator[Slurm]:
    """munged (as the munge user, with its own key and socket), slurmctld and slurmd, in the foreground."""
    reason = _why_not()
    if reason is not None:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="distfinalize-slurm-"))
    root.chmod(0o755)  # munged (as munge) must reach its own dir inside
    for sub in ("state", "spool", "log"):
        (root / sub).mkdir()
    munge_dir = root / "munge"
    munge_dir.mkdir(mode=0o711)
    key = munge_dir / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    for path in (munge_dir, key):
        shutil.chown(path, "munge", "munge")
    sock = munge_dir / "munge.socket"
    node = _node_name()
    conf = root / "slurm.conf"
    conf.write_text(_conf(root, node, sock))
    cluster = Slurm(root, conf, node)
    procs: list[subprocess.Popen] = []

    def start(cmd: list[str], log: str, **kwargs) -> None:
        with open(root / "log" / log, "wb") as out:
            procs.append(
                subprocess.Popen(
                    cmd, stdout=out, stderr=subprocess.STDOUT, env=cluster.env(), preexec_fn=_die_with_parent, **kwargs
                )
            )

    logs = [root / "log" / n for n in ("munged.out", "slurmctld.out", "slurmd.out", "slurmctld.log", "slurmd.log")]
    try:
        munged = [_which("munged"), "-F", f"--socket={sock}", f"--key-file={key}", f"--seed-file={munge_dir}/seed"]
        munged += [f"--pid-file={munge_dir}/munged.pid", f"--log-file={munge_dir}/munged.log"]
        start(munged, "munged.out", user="munge", group="munge", extra_groups=[])
        munge_ok = f"{_which('munge')} -n -S {sock} | {_which('unmunge')} -S {sock} >/dev/null 2>&1"
        _wait("munged", lambda: subprocess.run(munge_ok, shell=True, check=False).returncode == 0, logs)
        start([_which("slurmctld"), "-D", "-i", "-f", str(conf)], "slurmctld.out")
        start([_which("slurmd"), "-D", "-f", str(conf), "-N", node], "slurmd.out")

        def idle() -> bool:
            done = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=cluster.env())
            return done.returncode == 0 and done.stdout.strip() == "idle"

        _wait("slurmctld and slurmd (node idle)", idle, logs)
        yield cluster
    finally:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(["scancel", "--full", "--partition=debug"], env=cluster.env(), timeout=30, check=False)
        for proc in reversed(procs):  # slurmd, slurmctld, then munged: by PID, never by name
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(root, ignore_errors=True)
