"""A finalize killed mid-write leaves only its staging dir; --resume reuses the finished files and the result
is byte-identical to an uninterrupted run. Real processes, a real SIGKILL of the whole torchrun job."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import REPO, check_ok, env, finalize, torchrun

pytestmark = pytest.mark.dist

SHARD = "4MB"


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 0.15 GiB Llama-shaped bf16 DCP checkpoint from 2 ranks: many output files at --max-shard-size 4MB."""
    out = tmp_path_factory.mktemp("synthetic")
    check_ok(torchrun(2, REPO / "benchmarks" / "make_synthetic.py", out, "--size-gib", "0.15"))
    return out / "ckpt"


def kill_after_files(src: Path, dest: Path, files: int) -> None:
    """Start a 2-rank finalize, SIGKILL the whole job once `files` output files are recorded as finished."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "distfinalize",
        str(src),
        str(dest),
        "--max-shard-size",
        SHARD,
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = dest.with_name(dest.name + ".distfinalize-staging") / ".progress"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if progress.is_dir() and len(list(progress.glob("*.safetensors.json"))) >= files:
                break
            time.sleep(0.005)
    finally:
        for pid in [proc.pid, *descendants(proc.pid)]:  # torchrun starts its workers in their own sessions
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()


def descendants(root: int) -> list[int]:
    """Every process below `root`, from /proc (children before they can be reparented: read them all first)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def test_kill_then_resume(synthetic: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    staging = tmp_path / "out.distfinalize-staging"
    kill_after_files(synthetic, dest, files=2)
    assert not dest.exists(), "the job finished before it could be killed; use a bigger checkpoint"
    assert staging.is_dir()

    refused = finalize(synthetic, dest, "--max-shard-size", SHARD)
    assert refused.returncode == 1 and "--resume" in refused.stderr and staging.is_dir()
    other = finalize(synthetic, dest, "--max-shard-size", "8MB", "--resume")
    assert other.returncode == 1 and "made for a different output plan" in other.stderr and staging.is_dir()

    result = check_ok(finalize(synthetic, dest, "--max-shard-size", SHARD, "--resume", nproc=2))
    assert result.stderr.count("resume: reusing") >= 2
    assert not staging.exists() and not (dest / ".progress").exists()

    fresh = tmp_path / "fresh" / "out"  # same name: the card is titled after it
    # the same ranks: a file several ranks write has a sha256 per rank's piece in the manifest
    check_ok(finalize(synthetic, fresh, "--max-shard-size", SHARD, nproc=2))
    names = sorted(p.name for p in fresh.iterdir())
    assert names == sorted(p.name for p in dest.iterdir())
    for name in names:
        assert (dest / name).read_bytes() == (fresh / name).read_bytes(), name
