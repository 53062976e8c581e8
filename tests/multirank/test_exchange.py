"""--strategy exchange: real FSDP2 / DTensor checkpoints, 2 and 3 gloo ranks, output identical to --strategy read.

Marked `dist`: real torchrun jobs on CPU/gloo. A small --read-batch makes the exchange take many rounds.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import (
    TIMEOUT_S,
    TRAINERS,
    check_ok,
    env,
    error_lines,
    finalize,
    our_traceback,
    read_json,
    read_output,
    torchrun,
    tree_digest,
)

pytestmark = pytest.mark.dist

SHARD = "60KB"
MANIFEST = "distfinalize-manifest.json"


def same_output(a: Path, b: Path) -> bool:
    """Every file byte-identical, the manifest included: both strategies follow the same plan, so a file several
    ranks write has the same pieces (each with its sha256) either way."""
    return tree_digest(a) == tree_digest(b)


def finalize_both(src: Path, tmp_path: Path, nproc: int, *args: str) -> tuple[Path, Path]:
    """The same finalize with each strategy; the dirs share a name (the model card names its dir)."""
    read, exchange = tmp_path / "read" / "model", tmp_path / "exchange" / "model"
    check_ok(finalize(src, read, "--max-shard-size", SHARD, *args, nproc=nproc))
    result = check_ok(
        finalize(
            src,
            exchange,
            "--max-shard-size",
            SHARD,
            "--strategy",
            "exchange",
            "--read-batch",
            "20KB",
            "--log-level",
            "debug",
            *args,
            nproc=nproc,
        )
    )
    assert "exchange: " in result.stderr and "round(s)" in result.stderr
    return read, exchange


@pytest.mark.parametrize("nproc", [2, 3])
def test_exchange_matches_read_fsdp2(fsdp2_runs: Path, tmp_path: Path, nproc: int) -> None:
    run = fsdp2_runs / "untied-optim"
    read, exchange = finalize_both(run, tmp_path, nproc)
    assert same_output(exchange, read)
    tensors, _ = read_output(exchange)
    reference = torch.load(run / "reference.pt")
    assert set(tensors) == set(reference)
    assert all(torch.equal(tensors[k], reference[k]) for k in tensors)


def test_exchange_matches_read_uneven_dtensor_bf16(dtensor_run: Path, tmp_path: Path) -> None:
    """Saved by 3 ranks with uneven row/column shards, exchanged by 2 (two files read by rank 0), cast."""
    read, exchange = finalize_both(dtensor_run, tmp_path, 2, "--dtype", "bfloat16", "--write-threads", "3")
    assert same_output(exchange, read)


def test_exchange_corrupt_chunk_is_one_error(fsdp2_runs: Path, tmp_path: Path) -> None:
    """A flipped byte is caught by the rank that reads the file; every rank stops; nothing at DEST."""
    from trust.test_bad_input import CKPT, flip_tensor_bytes

    run = tmp_path / "run"
    shutil.copytree(fsdp2_runs / "untied-optim", run)
    flip_tensor_bytes(run)
    before = tree_digest(run)
    dest = tmp_path / "out"
    result = finalize(run, dest, "--max-shard-size", SHARD, "--strategy", "exchange", "--read-batch", "20KB", nproc=2)
    assert result.returncode == 1, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert "a checkpoint file is corrupt" in lines[0] and "checksum" in lines[0], lines[0]
    assert not our_traceback(result.stderr)
    assert not dest.exists() and not dest.with_name("out.distfinalize-staging").exists()
    assert tree_digest(run) == before
    assert (run / CKPT).is_dir()


def test_exchange_tie_check_reads_only_its_files(tmp_path: Path) -> None:
    """lm_head identical to embed_tokens (config.json says untied), saved by 2 ranks: under exchange each rank
    compares the chunks of the files it reads, and the answer (tied: written once) is the one read gives."""
    check_ok(torchrun(2, TRAINERS / "dtensor.py", tmp_path / "run", "--identical-head"))
    read, exchange = finalize_both(tmp_path / "run" / "dtensor", tmp_path, 2)
    assert same_output(exchange, read)
    tensors, _ = read_output(exchange)
    assert "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors


def held_buffers(stderr: str) -> list[dict[str, int]]:
    """Every rank's `exchange: largest buffers held` debug line: its largest send and receive buffers and the
    largest tensor or block of rows it assembled."""
    found = re.findall(r"exchange: largest buffers held: (\{.*?\}) bytes", stderr)
    return [ast.literal_eval(text) for text in found]


def test_tensors_larger_than_the_read_batch_move_in_row_blocks(fsdp2_runs: Path, tmp_path: Path) -> None:
    """--read-batch 100KB: rounds of 50 KB each way, under the 64 KB embedding and lm_head (saved by 2 ranks: chunks
    of 32 KB), which move in blocks of rows, so no rank holds a send buffer, a receive buffer or a tensor over the
    round; peak RSS per rank within 2 x --read-batch + 1 GiB (the --report); the output bit for bit the trained
    model."""
    run = fsdp2_runs / "untied-optim"
    dest, report = tmp_path / "model", tmp_path / "report.json"
    batch = 100_000
    args = ("--strategy", "exchange", "--read-batch", "100KB", "--log-level", "debug", "--report", str(report))
    result = check_ok(finalize(run, dest, "--max-shard-size", SHARD, *args, nproc=2))
    held = held_buffers(result.stderr)
    assert len(held) == 2, result.stderr
    assert all(0 < max(h.values()) <= batch // 2 for h in held), held
    tensors, _ = read_output(dest)
    reference = torch.load(run / "reference.pt")
    assert max(t.nbytes for t in reference.values()) > batch // 2  # the embedding is bigger than a round
    assert set(tensors) == set(reference) and all(torch.equal(tensors[k], reference[k]) for k in tensors)
    ranks = json.loads(report.read_text())["ranks"]
    assert len(ranks) == 2 and all(r["peak_rss_bytes"] <= 2 * batch + 2**30 for r in ranks), ranks


def test_quantized_row_blocks_match_read(fsdp2_runs: Path, tmp_path: Path) -> None:
    """--quantize fp8 (a scale per row): under exchange (rounds of 10 KB) the MLP weights move and are quantized in
    blocks of rows; the files are byte for byte those `read` writes from whole tensors."""
    read, exchange = finalize_both(fsdp2_runs / "untied-optim", tmp_path, 2, "--quantize", "fp8")
    assert tree_digest(exchange) == tree_digest(read)


def cut_tensors(dest: Path, filename: str) -> list[str]:
    """The tensors of a file whose bytes hold a boundary between two ranks' pieces (from its manifest entry)."""
    entry = read_json(dest / MANIFEST)["files"][filename]
    bounds = [start for start, _, _ in entry.get("pieces", [])[1:]]
    with open(dest / filename, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    spans = {k: (8 + length + v["data_offsets"][0], 8 + length + v["data_offsets"][1]) for k, v in header.items()}
    return sorted(k for k, (lo, hi) in spans.items() if any(lo < b < hi for b in bounds))


def test_exchange_cuts_tensors_between_ranks(fsdp2_runs: Path, tmp_path: Path) -> None:
    """One output file written by 3 ranks under exchange: the plan cuts tensors between ranks by rows, wherever
    their stored chunks (saved by 2 ranks) start, and each writer receives just its rows of them; the file is the
    one read writes, manifest and per-piece checksums included, the trained model bit for bit, and `verify`
    passes."""
    run = fsdp2_runs / "untied-optim"
    read, exchange = finalize_both(run, tmp_path, 3, "--max-shard-size", "10GB")
    assert sorted(p.name for p in exchange.glob("*.safetensors")) == ["model.safetensors"]
    assert len(read_json(exchange / MANIFEST)["files"]["model.safetensors"]["pieces"]) == 3
    assert cut_tensors(exchange, "model.safetensors"), "the plan cut no tensor between ranks"
    assert same_output(exchange, read)
    tensors, _ = read_output(exchange)
    reference = torch.load(run / "reference.pt")
    assert set(tensors) == set(reference) and all(torch.equal(tensors[k], reference[k]) for k in tensors)
    cmd = [sys.executable, "-m", "distfinalize", "verify", str(exchange), "--source", str(run), "--json"]
    result = check_ok(subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=TIMEOUT_S, check=False))
    checks = {c["name"]: c["status"] for c in json.loads(result.stdout)["checks"]}
    assert checks["checksums"] == "pass" and checks["source tensors"] == "pass", checks


def test_chunks_larger_than_a_round_move_in_slices(fsdp2_runs: Path, tmp_path: Path) -> None:
    """--read-batch 16KB: rounds of 8 KB each way, under the 32 KB stored chunks of the embedding and lm_head
    (saved by 2 ranks), which their readers send in slices of rows: no send or receive buffer, and no block a
    rank assembles, over the round; the chunks a rank holds between rounds are stored chunks it is still
    slicing; peak RSS per rank within 2 x --read-batch + 1 GiB; the output the trained model bit for bit."""
    run = fsdp2_runs / "untied-optim"
    dest, report = tmp_path / "model", tmp_path / "report.json"
    batch, chunk = 16_000, 32 * 1024
    args = ("--strategy", "exchange", "--read-batch", "16KB", "--log-level", "debug", "--report", str(report))
    result = check_ok(finalize(run, dest, "--max-shard-size", SHARD, *args, nproc=2))
    held = held_buffers(result.stderr)
    assert len(held) == 2, result.stderr
    assert all(max(h["sent"], h["received"], h["piece"]) <= batch // 2 for h in held), held
    assert max(h["chunks"] for h in held) >= chunk, held  # a 32 KB chunk kept while its slices go out
    tensors, _ = read_output(dest)
    reference = torch.load(run / "reference.pt")
    assert set(tensors) == set(reference) and all(torch.equal(tensors[k], reference[k]) for k in tensors)
    ranks = json.loads(report.read_text())["ranks"]
    assert len(ranks) == 2 and all(r["peak_rss_bytes"] <= 2 * batch + 2**30 for r in ranks), ranks
