"""32 ranks on CPU/gloo over a checkpoint that FSDP2 saved from 32 ranks (32 `.distcp` writers): every step's
agreement, the gather of the write results and (with `--strategy exchange`) the rounds at a width where a cost in
ranks x ranks would show; the output bit for bit the trained model. Wall times for 4, 16 and 32 ranks are in
BENCHMARKS.md, not asserted here. Marked `dist`: real torchrun jobs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support import TRAINERS, check_ok, finalize, torchrun
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
    """One file per tensor or so (17 files: 17 ranks write, 15 only agree), the embedding larger than --read-batch."""
    ckpt = run32 / "checkpoints" / "checkpoint-1"
    assert len(list(ckpt.glob("__*_0.distcp"))) == WORLD
    dest = tmp_path / "model"
    args = ("--max-shard-size", "8KB", "--read-batch", "16KB", "--strategy", strategy)
    check_ok(finalize(run32, dest, *args, nproc=WORLD))
    assert len(list(dest.glob("*.safetensors"))) > WORLD // 2
    check_finalized(run32, dest, torch.float32)
