"""Helpers of the trust tests: start a real torchrun finalize in the background, wait (bounded) until its output
shows a step was reached, signal it, and collect what each rank printed."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from launching import bare_env
from support import REPO, TIMEOUT_S, error_lines

ARGS = ("--max-shard-size", "60KB", "--timeout", "60")  # several files per rank, a bounded wait per step
STAGING = ".distfinalize-staging"


@dataclass
class Run:
    """A finalize started in the background; its output goes to a file (no pipe to fill)."""

    proc: subprocess.Popen
    log: Path

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 120) -> None:
        """Until `text` appears in the output (bounded; fails if the run ended or the time passed)."""
        deadline = time.monotonic() + timeout
        while text not in self.output:
            ended = self.proc.poll()
            assert ended is None, f"the run ended (exit {ended}) before {text!r}:\n{self.output}"
            assert time.monotonic() < deadline, f"no {text!r} after {timeout} s:\n{self.output}"
            time.sleep(0.05)

    def finish(self, timeout: float = TIMEOUT_S) -> tuple[int, str]:
        """(torchrun's exit code, everything printed); kills the whole tree when it outlives `timeout`."""
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                kill_tree(self.proc.pid)
                self.proc.wait()
        return self.proc.returncode, self.output

    def worker(self, rank: int, timeout: float = 60) -> int:
        """The pid of the worker process of `rank` (read from /proc: its RANK variable)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for pid in descendants(self.proc.pid):
                with contextlib.suppress(OSError):
                    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                    ours = b"distfinalize" in Path(f"/proc/{pid}/cmdline").read_bytes()
                    if ours and f"RANK={rank}".encode() in environ:
                        return pid
            time.sleep(0.05)
        raise AssertionError(f"no worker of rank {rank}:\n{self.output}")


def start(src: Path, dest: Path, *args: str, nproc: int = 2, fail_at: str | None = None, log: Path) -> Run:
    """`torchrun --nproc_per_node=nproc -m distfinalize SRC DEST ARGS` in the background (its own session)."""
    extra = {"DISTFINALIZE_FAIL_AT": fail_at} if fail_at else {}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "distfinalize",
        str(src),
        str(dest),
        *args,
    ]
    out = log.open("w")
    proc = subprocess.Popen(
        cmd, env=bare_env(**extra), stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
    )
    out.close()
    return Run(proc, log)


def run(src: Path, dest: Path, *args: str, nproc: int = 2, fail_at: str | None = None, log: Path) -> tuple[int, str]:
    """A finalize to its end: (exit code, output)."""
    return start(src, dest, *args, nproc=nproc, fail_at=fail_at, log=log).finish()


def descendants(root: int) -> list[int]:
    """Every process below `root`, from /proc."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = [], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        found += frontier
    return found


def kill_tree(root: int) -> None:
    for pid in [root, *descendants(root)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def staging_of(dest: Path) -> Path:
    return dest.with_name(dest.name + STAGING)


def finished_records(dest: Path) -> int:
    return len(list((staging_of(dest) / ".progress").glob("*.json")))


def verify(dest: Path, *args: str) -> subprocess.CompletedProcess:
    """`distfinalize verify DEST ARGS`, a plain process."""
    cmd = [sys.executable, "-m", "distfinalize", "verify", str(dest), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=bare_env(), cwd=REPO, timeout=TIMEOUT_S, check=False)


def one_error_line(output: str) -> str:
    lines = error_lines(output)
    assert len(lines) == 1, output
    return lines[0]
