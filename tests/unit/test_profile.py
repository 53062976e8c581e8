"""DISTFINALIZE_PROFILE: every thread's profile is written before the hard exit of the command line."""

from __future__ import annotations

import os
import pstats
import subprocess
import sys
from pathlib import Path


def test_profiles_are_written_per_thread(tmp_path: Path) -> None:
    """A real `python -m distfinalize` process (its hard exit included) leaves one readable pstats per thread."""
    code = (
        "import threading, sys\n"
        "from distfinalize import startup, cli\n"
        "startup.imports_starting()\n"
        "t = threading.Thread(target=sum, args=([1, 2],), name='distfinalize-write0'); t.start(); t.join()\n"
        "cli.main = lambda argv=None: 0\n"
        "cli.console_main()\n"
    )
    env = dict(os.environ, DISTFINALIZE_PROFILE=str(tmp_path / "prof"), RANK="3")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    files = sorted(p.name for p in (tmp_path / "prof").iterdir())
    assert files == ["rank3-MainThread.pstats", "rank3-distfinalize-write0.pstats"]
    stats = pstats.Stats(str(tmp_path / "prof" / "rank3-distfinalize-write0.pstats"))
    assert any(name == "<built-in method builtins.sum>" for _, _, name in stats.stats)


def test_the_launchers_profile_is_not_a_ranks(tmp_path: Path) -> None:
    """`distfinalize run`'s own process (SLURM_PROCID may be set there) names its files after itself."""
    code = (
        "from distfinalize import startup, cli\n"
        "startup.imports_starting()\n"
        "startup.profile_as('launcher-node1')\n"
        "cli.main = lambda argv=None: 0\n"
        "cli.console_main()\n"
    )
    env = dict(os.environ, DISTFINALIZE_PROFILE=str(tmp_path / "prof"), SLURM_PROCID="0")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "prof").iterdir()) == ["launcher-node1-MainThread.pstats"]
