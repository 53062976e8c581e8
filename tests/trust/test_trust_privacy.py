"""Nothing DEST holds (and --push-to-hub would publish) names where the checkpoint lay on this machine: the card
and the manifests record the checkpoint folder relative to SRC, and `verify --source` still finds it. Real CLI
runs on a trained FSDP2 run copied under a directory with a unique name."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from support import TIMEOUT_S, check_ok, env, finalize, read_json

pytestmark = pytest.mark.dist

CKPT = Path("checkpoints") / "checkpoint-3"


def verify(dest: Path, src: Path) -> dict:
    cmd = [sys.executable, "-m", "distfinalize", "verify", str(dest), "--source", str(src), "--json"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=TIMEOUT_S, check=False)
    check_ok(result)
    return json.loads(result.stdout)


def leaks(dest: Path, needles: list[str]) -> list[str]:
    """Every file (and link target) under DEST that holds one of `needles`, as 'path: needle'."""
    found = []
    for path in sorted(dest.rglob("*")):
        blobs = [os.readlink(path).encode()] if path.is_symlink() else []
        if path.is_file() and not path.is_symlink():
            blobs.append(path.read_bytes())
        found += [f"{path}: {n}" for n in needles for blob in blobs if n.encode() in blob]
    return found


@pytest.fixture
def private_run(fsdp2_runs: Path, tmp_path: Path) -> tuple[Path, str]:
    """The run under tmp/<marker>/home/runs/exp (absolute), and the marker."""
    marker = f"private-{uuid.uuid4().hex}"
    src = (tmp_path / marker / "home" / "runs" / "exp").resolve()
    shutil.copytree(fsdp2_runs / "untied-optim", src)
    return src, marker


def test_dest_names_no_absolute_source_path(private_run: tuple[Path, str], tmp_path: Path) -> None:
    src, marker = private_run
    dest = tmp_path / "out" / "model"
    check_ok(finalize(src, dest, "--keep-checkpoint", "--max-shard-size", "100KB"))
    assert leaks(dest, [str(src), marker, str(tmp_path)]) == []
    manifest = read_json(dest / "distfinalize-manifest.json")
    assert manifest["source"]["path"] == CKPT.as_posix() and manifest["source"]["step"] == 3
    kept = next((dest / "checkpoints").glob("*/"))
    assert any(CKPT.as_posix() in p.read_text() for p in kept.glob("*.json"))  # the kept manifest, relative too
    assert f"- Path: `{CKPT.as_posix()}`" in (dest / "README.md").read_text()
    data = verify(dest, src)
    assert data["passed"], data
    rows = {c["name"]: c for c in data["checks"]}
    assert rows["source tensors"]["status"] == "pass", rows["source tensors"]
    assert "manifest says it was made from" not in rows["source tensors"]["detail"]


def test_checkpoint_outside_src_is_named_only(private_run: tuple[Path, str], tmp_path: Path) -> None:
    """--checkpoint (absolute) outside SRC: the card and manifest hold the folder's name, never its path."""
    src, marker = private_run
    other = tmp_path / "elsewhere"
    other.mkdir()
    shutil.copy(src / "config.json", other / "config.json")
    dest = tmp_path / "out" / "model"
    check_ok(finalize(other, dest, "--checkpoint", str(src / CKPT)))
    assert leaks(dest, [str(src), marker, str(tmp_path)]) == []
    assert read_json(dest / "distfinalize-manifest.json")["source"]["path"] == CKPT.name
    data = verify(dest, src)  # verify gets the run as SRC; the recorded name is not under it, the latest is found
    assert data["passed"], data
