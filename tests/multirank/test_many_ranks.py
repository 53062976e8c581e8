"""32 ranks on CPU/gloo over a checkpoint that FSDP2 saved from 32 ranks (32 `.distcp` writers): every step's
agreement, the gather of the write results and (with `--strategy exchange`) the rounds at a width where a cost in
ranks x ranks would show; the output bit for bit the trained model. Wall times for 4, 16 and 32 ranks are in
BENCHMARKS.md, not asserted here. Marked `dist`: real torchrun jobs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support import TRAINERS, check_ok, finalize, torchrun
from test_exchange import held_buffers
from test_finalize_dcp import check_finalized

pytestmark = pytest.mark.dist
WORLD = 32


@pytest.fixture(scope="module")
def run32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fsdp2-32")
    check_ok(torchrun(WORLD, TRAINERS / "fsdp2.py", out, "--variant", "untied-model", "--steps", "1"))
    return out / "untied-model"


@pytest.mark.parametrize("strategy", ["read", "exchange"])
def test_32_ranks_bit_exact(run32: Path, tmp_path: Path, strategy: str) -> None:
    """One file per tensor or so (17 files: 17 ranks write, 15 only agree), the embedding larger than --read-batch:
    with `exchange` it moves in blocks of rows, every rank's buffers within a round (half the batch), peak RSS within
    2 x --read-batch + 1 GiB (the --report)."""
    ckpt = run32 / "checkpoints" / "checkpoint-1"
    assert len(list(ckpt.glob("__*_0.distcp"))) == WORLD
    dest, report = tmp_path / "model", tmp_path / "report.json"
    args = ("--max-shard-size", "8KB", "--read-batch", "16KB", "--strategy", strategy, "--report", str(report))
    debug = ("--log-level", "debug") if strategy == "exchange" else ()
    result = check_ok(finalize(run32, dest, *args, *debug, nproc=WORLD))
    assert len(list(dest.glob("*.safetensors"))) > WORLD // 2
    check_finalized(run32, dest, torch.float32)
    ranks = json.loads(report.read_text())["ranks"]
    assert len(ranks) == WORLD and all(r["peak_rss_bytes"] <= 2 * 16_000 + 2**30 for r in ranks)
    if strategy == "exchange":
        held = held_buffers(result.stderr)
        assert len(held) == WORLD and all(max(h.values()) <= 16_000 // 2 for h in held), held
        assert max(h["piece"] for h in held) > 0
