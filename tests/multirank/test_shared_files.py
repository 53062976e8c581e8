"""Several ranks per output file, for real: 4 ranks over a checkpoint FSDP2 saved from 2, with fewer output files
than ranks. Each rank writes its byte range of the file in place; the output is the trained model bit for bit,
loads with transformers to the same logits, and `verify` checks every range's sha256 (and finds a flipped byte
in one). Marked `dist`: real torchrun jobs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import common
import pytest
import torch
from support import TIMEOUT_S, TRAINERS, check_ok, env, finalize, read_json, read_output, torchrun
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.dist
WORLD = 4


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fsdp2-shared")
    check_ok(torchrun(2, TRAINERS / "fsdp2.py", out, "--variant", "untied-model", "--steps", "1"))
    return out / "untied-model"


@pytest.fixture(scope="module")
def one_file(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole model in one model.safetensors written by 4 ranks; the embedding bigger than --read-batch."""
    dest = tmp_path_factory.mktemp("shared") / "model"
    args = ("--max-shard-size", "10GB", "--read-batch", "16KB", "--report", str(dest.parent / "report.json"))
    check_ok(finalize(run, dest, *args, nproc=WORLD))
    return dest


def verify(dest: Path, *args: str | Path, nproc: int = 1) -> subprocess.CompletedProcess:
    if nproc > 1:
        return torchrun(nproc, "-m", "distfinalize", "verify", dest, *args)
    cmd = [sys.executable, "-m", "distfinalize", "verify", str(dest), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=TIMEOUT_S, check=False)


def check_model(run: Path, dest: Path) -> None:
    """Every tensor bit-identical to the trained one; transformers loads it to the trained model's logits."""
    reference = torch.load(run / "reference.pt")
    tensors, _ = read_output(dest)
    assert set(tensors) == set(reference)
    for name, tensor in tensors.items():
        assert tensor.dtype == reference[name].dtype and torch.equal(tensor, reference[name]), name
    model = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=common.reference_input()).logits
    assert torch.equal(logits, torch.load(run / "reference_logits.pt"))


def test_one_file_written_by_every_rank(run: Path, one_file: Path) -> None:
    check_model(run, one_file)
    assert sorted(p.name for p in one_file.glob("*.safetensors")) == ["model.safetensors"]
    entry = read_json(one_file / "distfinalize-manifest.json")["files"]["model.safetensors"]
    size = (one_file / "model.safetensors").stat().st_size
    assert entry["size"] == size and "sha256" not in entry
    assert len(entry["pieces"]) == WORLD
    bounds = [0, *(stop for _, stop, _ in entry["pieces"])]
    assert [p[0] for p in entry["pieces"]] == bounds[:-1] and bounds[-1] == size
    report = read_json(one_file.parent / "report.json")
    assert report["weight_files"] == 1 and report["weight_bytes"] == size


@pytest.mark.parametrize("nproc", [1, 2])
def test_verify_checks_every_range(run: Path, one_file: Path, nproc: int) -> None:
    result = check_ok(verify(one_file, "--source", run, "--json", nproc=nproc))
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["checksums"]["status"] == "pass" and checks["source tensors"]["status"] == "pass"


def test_verify_finds_a_flipped_byte_in_one_range(one_file: Path, tmp_path: Path) -> None:
    damaged = tmp_path / "copy"
    damaged.mkdir()
    for p in one_file.iterdir():
        (damaged / p.name).write_bytes(p.read_bytes())
    pieces = read_json(damaged / "distfinalize-manifest.json")["files"]["model.safetensors"]["pieces"]
    start, stop, _ = pieces[2]
    path = damaged / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[(start + stop) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    result = verify(damaged, "--json")
    assert result.returncode == 1, result.stderr
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["checksums"]["status"] == "fail"
    assert checks["checksums"]["detail"].startswith(f"model.safetensors: bytes [{start}, {stop}) differ from the")
    assert "Traceback" not in result.stderr


def test_exchange_shares_files(run: Path, tmp_path: Path) -> None:
    """--strategy exchange: files shared by ranks as with read (tensors cut between ranks by rows), bit-exact,
    every range's sha256 verified."""
    dest = tmp_path / "model"
    result = check_ok(finalize(run, dest, "--max-shard-size", "300KB", "--strategy", "exchange", nproc=WORLD))
    assert "Traceback" not in result.stderr
    check_model(run, dest)
    files = read_json(dest / "distfinalize-manifest.json")["files"]
    assert len(files) < WORLD and any("pieces" in e for e in files.values())
    check_ok(verify(dest))
