"""A tensor stored in large chunks of whole rows goes through the write step chunk by chunk, each chunk as read
(write/feed.py `chunk_blocks`, DcpTensorReader.read_rows): never put together, and still bit-exact.

The checkpoint is benchmarks/make_synthetic.py's (DTensor Shard(0), fp32, saved by 2 ranks through dcp.save): its
embedding and lm_head are stored in chunks of 8 MB, its layer weights in chunks below CHUNK_BLOCK_BYTES (read
whole), so one finalize goes both ways. Expected tensors are rebuilt from the generator that drew each rank's
shard.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from support import REPO, check_ok, finalize, read_output, torchrun

from distfinalize.plan import TensorPlan
from distfinalize.sources.dcp import DcpSource
from distfinalize.write.feed import CHUNK_BLOCK_BYTES, chunk_blocks

sys.path.insert(0, str(REPO / "benchmarks"))
from make_synthetic import choose_dims, llama_shapes, local_shard

pytestmark = pytest.mark.dist

SIZE_GIB = 0.03
SAVE_RANKS = 2


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    check_ok(
        torchrun(
            SAVE_RANKS,
            REPO / "benchmarks" / "make_synthetic.py",
            out,
            "--size-gib",
            str(SIZE_GIB),
            "--dtype",
            "float32",
        )
    )
    return out / "ckpt"


def expected() -> dict[str, torch.Tensor]:
    shapes = llama_shapes(*choose_dims(SIZE_GIB, 4))
    return {
        name: torch.cat([local_shard(name, shape, r, SAVE_RANKS, torch.float32) for r in range(SAVE_RANKS)])
        for name, shape in shapes.items()
    }


def test_large_row_chunks_are_blocks_read_without_a_copy(ckpt: Path) -> None:
    reader = DcpSource(ckpt).reader()
    sizes = {name: tensor.shape for name, tensor in expected().items()}
    plans = {n: TensorPlan(n, n, tuple(s), torch.float32, torch.bfloat16) for n, s in sizes.items()}
    embed = plans["model.embed_tokens.weight"]
    rows = embed.shape[0]
    assert chunk_blocks(embed, reader.row_cuts(embed.source_key)) == [(0, rows // 2), (rows // 2, rows)]
    small = plans["model.layers.0.self_attn.q_proj.weight"]
    assert small.source_nbytes < CHUNK_BLOCK_BYTES * SAVE_RANKS
    assert chunk_blocks(small, reader.row_cuts(small.source_key)) is None
    quantized = TensorPlan(embed.name, embed.source_key, embed.shape, torch.float32, torch.bfloat16, quant="fp8")
    # a recipe's blocks follow its own row group
    assert chunk_blocks(quantized, reader.row_cuts(quantized.source_key)) is None

    whole = expected()[embed.name]
    block = reader.read_rows(embed.source_key, rows // 2, rows)
    assert torch.equal(block, whole[rows // 2 :])
    assert block.untyped_storage().nbytes() > block.nbytes  # the chunk's record as read, not a copy
    part = reader.read_rows(embed.source_key, rows // 2 - 3, rows // 2 + 5)  # across two chunks: put together
    assert torch.equal(part, whole[rows // 2 - 3 : rows // 2 + 5])
    assert part.untyped_storage().nbytes() == part.nbytes


@pytest.mark.parametrize(
    ("nproc", "args"),
    [
        (1, ("--dtype", "bfloat16")),  # whole tensors and chunk blocks in one batch
        (1, ("--dtype", "float32", "--read-batch", "4MB")),  # no cast: the blocks are the chunks' own bytes
        (2, ("--dtype", "bfloat16", "--read-batch", "4MB")),  # ranks cut the embedding between them
    ],
)
def test_outputs_are_bit_exact(ckpt: Path, tmp_path: Path, nproc: int, args: tuple[str, ...]) -> None:
    dest = tmp_path / "out"
    check_ok(finalize(ckpt, dest, "--max-shard-size", "20MB", *args, nproc=nproc))
    got, _ = read_output(dest)
    want = expected()
    assert sorted(got) == sorted(want)
    dtype = torch.bfloat16 if "bfloat16" in args else torch.float32
    for name, tensor in want.items():
        assert got[name].dtype == dtype and torch.equal(got[name], tensor.to(dtype)), name
