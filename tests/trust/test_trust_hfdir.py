"""Bad Hugging Face model dirs and HuggingFaceStorageWriter saves as SRC: one clear line, non-zero exit, nothing at
DEST (no staging left), SRC unchanged. The dirs are real Trainer / save_pretrained / dcp.save outputs, broken here
the way disks and copies break them. And what lies beside the weights in a Trainer's checkpoint-N (optimizer.pt,
training_args.bin, ...) is never read.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from support import check_ok, error_lines, finalize, our_traceback, read_output, tree_digest

pytestmark = pytest.mark.dist

CHECKPOINT = "checkpoint-4"


def assert_clean_failure(result: subprocess.CompletedProcess, dest: Path, src: Path, before: dict, *words: str) -> None:
    assert result.returncode == 1, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert not our_traceback(result.stderr), result.stderr
    assert not dest.exists() and not dest.with_name(dest.name + ".distfinalize-staging").exists()
    assert tree_digest(src) == before


def rewrite_header(path: Path, change: Callable[[dict], None]) -> None:
    """Edit a safetensors file's JSON header in place (the tensor data after it unchanged)."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    change(header)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length :])


def grow_last_tensor(header: dict) -> None:
    """The last tensor in the data claims one more row: its offsets run past the end of the file."""
    name = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    entry = header[name]
    start, end = entry["data_offsets"]
    row = (end - start) // entry["shape"][0]
    entry["shape"][0] += 1
    entry["data_offsets"] = [start, end + row]


def write_pickled_object(path: Path) -> None:
    """A pytorch_model.bin that holds an object besides the tensors (as training_args.bin holds one)."""
    state = torch.load(path, weights_only=True)
    state["args"] = argparse.Namespace(learning_rate=0.01)
    torch.save(state, path)


CASES = {
    # (variant, how to break it, words of the error line)
    "index names a missing file": (
        "sharded-safetensors",
        lambda run: (run / "model-00003-of-00006.safetensors").unlink(),
        ["model.safetensors.index.json names a weight file that is not there (model-00003-of-00006.safetensors)"],
    ),
    "bin index names a missing file": (
        "sharded-bin",
        lambda run: (run / "pytorch_model-00002-of-00006.bin").unlink(),
        ["pytorch_model.bin.index.json names a weight file that is not there"],
    ),
    "truncated safetensors": (
        "trainer-untied",
        lambda run: os.truncate(run / CHECKPOINT / "model.safetensors", 300_000),
        ["a safetensors file is corrupt or truncated", "model.safetensors", "the file holds"],
    ),
    "header offsets past the file": (
        "trainer-tied",
        lambda run: rewrite_header(run / CHECKPOINT / "model.safetensors", grow_last_tensor),
        ["a safetensors file is corrupt or truncated", "the tensors cover"],
    ),
    "bin holding a pickled object": (
        "bin",
        lambda run: write_pickled_object(run / CHECKPOINT / "pytorch_model.bin"),
        ["holds an object of class argparse.Namespace", "weights_only=True", "pytorch_model.bin"],
    ),
    "truncated bin": (
        "bin",
        lambda run: os.truncate(run / CHECKPOINT / "pytorch_model.bin", 200_000),
        ["not a readable torch.save file", "pytorch_model.bin"],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_model_dirs(hf_trainer_runs: Path, tmp_path: Path, case: str) -> None:
    variant, breaks, words = CASES[case]
    run = tmp_path / "run"
    shutil.copytree(hf_trainer_runs / variant, run)
    breaks(run)
    before = tree_digest(run)
    dest = tmp_path / "out"
    assert_clean_failure(finalize(run, dest), dest, run, before, *words)


def test_broken_model_dir_under_torchrun(hf_trainer_runs: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(hf_trainer_runs / "trainer-untied", run)
    os.truncate(run / CHECKPOINT / "model.safetensors", 300_000)
    before = tree_digest(run)
    dest = tmp_path / "out"
    result = finalize(run, dest, nproc=2)
    assert_clean_failure(result, dest, run, before, "a safetensors file is corrupt or truncated")


@pytest.mark.parametrize(
    ("rank", "words"),
    [
        (1, ["per-rank safetensors files of 1 saving rank(s) are missing (shard-00001-*.safetensors)"]),
        (2, ["has shape [128, 64] in the checkpoint but config.json (LlamaForCausalLM) expects [256, 64]"]),
    ],
)
def test_a_missing_rank_file(hf_storage_runs: Path, tmp_path: Path, rank: int, words: list[str]) -> None:
    """HuggingFaceStorageWriter's per-rank files, one rank's missing: named by the gap in the file names, or (the
    last rank, which leaves no gap) by the tensors coming out shorter than config.json says."""
    run = tmp_path / "run"
    shutil.copytree(hf_storage_runs / "sharded", run)
    (run / "checkpoint" / "step-3" / f"shard-{rank:05d}-model-00001-of-00001.safetensors").unlink()
    before = tree_digest(run)
    dest = tmp_path / "out"
    assert_clean_failure(finalize(run, dest), dest, run, before, *words)


def test_overlapping_shards(hf_storage_runs: Path, tmp_path: Path) -> None:
    """A shard whose saved_offsets place it over another's rows: the pieces do not make up the tensor."""
    run = tmp_path / "run"
    shutil.copytree(hf_storage_runs / "sharded", run)

    def move_to_zero(header: dict) -> None:
        info = json.loads(header["__metadata__"]["DCP_SHARDING_INFO"])
        info["model.norm.weight"]["saved_offsets"] = [0]
        header["__metadata__"]["DCP_SHARDING_INFO"] = json.dumps(info)

    rewrite_header(run / "checkpoint" / "step-3" / "shard-00002-model-00001-of-00001.safetensors", move_to_zero)
    before = tree_digest(run)
    dest = tmp_path / "out"
    words = ["the stored pieces of 'model.norm.weight' do not make up the whole tensor"]
    assert_clean_failure(finalize(run, dest), dest, run, before, *words)


def test_files_beside_the_weights_are_never_read(hf_trainer_runs: Path, tmp_path: Path) -> None:
    """optimizer.pt and training_args.bin made unloadable (garbage; a pickle that would run code): the
    finalize does not notice them."""
    run = tmp_path / "run"
    shutil.copytree(hf_trainer_runs / "bin", run)
    ckpt = run / CHECKPOINT
    (ckpt / "optimizer.pt").write_bytes(b"\x00garbage")
    (ckpt / "training_args.bin").write_bytes(b"cos\nsystem\n(S'touch /tmp/pwned-by-distfinalize-test'\ntR.")
    check_ok(finalize(run, tmp_path / "out"))
    assert not Path("/tmp/pwned-by-distfinalize-test").exists()
    tensors, _ = read_output(tmp_path / "out")
    assert "model.embed_tokens.weight" in tensors
