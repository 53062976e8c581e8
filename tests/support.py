"""Helpers the tests share: run the CLI (alone or under torchrun), read outputs, checksum trees."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
TRAINERS = REPO / "examples" / "trainers"
TIMEOUT_S = 600


def env() -> dict[str, str]:
    """The subprocess environment: one thread per rank, quiet torchrun, the repo importable."""
    out = dict(os.environ)
    out.update({"OMP_NUM_THREADS": "1", "TORCHELASTIC_ERROR_FILE": "", "PYTHONUNBUFFERED": "1"})
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), out.get("PYTHONPATH", "")) if p)
    return out


def torchrun(nproc: int, *args: str | os.PathLike, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=nproc ARGS` (a script path or -m module), captured."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run(
        [*cmd, *map(str, args)], capture_output=True, text=True, env=env(), cwd=cwd, timeout=TIMEOUT_S, check=False
    )


def finalize(src: Path, dest: Path, *args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    """Run distfinalize with `nproc` ranks: under torchrun, or for one rank in this process (run_cli)."""
    if nproc == 1:
        return run_cli(src, dest, *args)
    return torchrun(nproc, "-m", "distfinalize", src, dest, *args)


def run_cli(*args: str | os.PathLike) -> subprocess.CompletedProcess:
    """`python -m distfinalize ARGS` as one process, run in this one through the command line's main, with its
    stdout and stderr captured and its exit code (argparse's included) returned: the same contract, without an
    interpreter start per case. What main sets up for a process (the `distfinalize` logger) is put back."""
    from distfinalize.cli import main

    logger = logging.getLogger("distfinalize")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved
    return subprocess.CompletedProcess(["distfinalize", *map(str, args)], code, out.getvalue(), err.getvalue())


def check_ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def read_output(dest: Path, header_extra: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a finalized dir, and which file each came from (read from the files themselves).

    Each header's metadata is {"format": "pt"}, plus other keys only when `header_extra` (torchao-* recipes)."""
    tensors, where = {}, {}
    for path in sorted(dest.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
            assert (metadata["format"] == "pt") if header_extra else (metadata == {"format": "pt"}), path
            for name in f.keys():  # noqa: SIM118  (safe_open has no __iter__)
                assert name not in tensors, f"{name} is in two files"
                tensors[name] = f.get_tensor(name)
                where[name] = path.name
    return tensors, where


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root (and the set of dirs), to prove a tree was not modified."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return out


def output_digest(root: Path) -> dict[str, str]:
    """tree_digest of an output dir, with its manifest's checksums left out (their sizes kept): a file several
    ranks write records a sha256 per piece, and the pieces depend on the world size. Every other file, the
    weights included, must match byte for byte."""
    out = tree_digest(root)
    manifest = root / "distfinalize-manifest.json"
    if manifest.is_file():
        data = json.loads(manifest.read_text())
        data["files"] = {name: entry["size"] for name, entry in data["files"].items()}
        out[manifest.name] = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
    return out


def finished_text(staging: Path) -> str:
    """How the error hint names what --resume will reuse from `staging`'s progress records: whole files, and the
    pieces ("file@start-stop") of files several ranks write."""
    names = [p.stem for p in (staging / ".progress").glob("*.json")]
    pieces = sum(1 for n in names if "@" in n)
    text = f"{len(names) - pieces} finished file(s)"
    return text + (f" and {pieces} finished piece(s) of shared files" if pieces else "")


def error_lines(stderr: str) -> list[str]:
    """The lines distfinalize itself printed as errors."""
    return [line for line in stderr.splitlines() if "distfinalize: error:" in line]


def our_traceback(stderr: str) -> bool:
    """Whether a Python traceback went through distfinalize's code (torchrun's own launcher report aside)."""
    return f'File "{REPO / "distfinalize"}' in stderr or "site-packages/distfinalize/" in stderr


def no_traceback(result: subprocess.CompletedProcess) -> bool:
    """No traceback from distfinalize; under torchrun, the launcher's own report of a failed rank aside."""
    launcher = "torch.distributed.run" in map(str, result.args)
    return not our_traceback(result.stderr) and (launcher or "Traceback" not in result.stderr)


def run_as_nobody(base: Path, *args: str | os.PathLike) -> subprocess.CompletedProcess:
    """`python -m distfinalize ARGS` as the `nobody` user: a real permission check (the tests run as root). `base`
    is its HOME."""
    child_env = {**env(), "HOME": str(base), "HF_HOME": str(base / "hf")}
    cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "distfinalize"]
    return subprocess.run(
        [*cmd, *map(str, args)], capture_output=True, text=True, env=child_env, cwd=REPO, timeout=TIMEOUT_S, check=False
    )
