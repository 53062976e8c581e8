"""The columns of a tensor's stored chunks (write/exchange_parts.py) give each block of rows the same parts as a
chunk-by-chunk cut, and DcpSource.chunks builds the same SourceChunks as one by one. Pure."""

from __future__ import annotations

import math
import random
from itertools import pairwise

import pytest
import torch

from distfinalize.sources import SourceChunk, TensorMeta
from distfinalize.sources.dcp import DcpSource
from distfinalize.sources.dcp_table import DcpShared, StoredChunk
from distfinalize.write.exchange_parts import Stored


def reference_parts(chunks, blocks):
    """Each block's (chunk, rows) parts, chunk by chunk: the rows of every chunk (sorted by offsets) in it."""
    ordered = sorted(chunks, key=lambda c: c.offsets)
    out = []
    for first, last in blocks:
        parts = []
        for c in ordered:
            lo, hi = c.offsets[0], c.offsets[0] + c.sizes[0]
            a, b = max(lo, first), min(hi, last)
            if a < b:
                parts.append((c, None if (a, b) == (lo, hi) else (a, b)))
        out.append(parts)
    return out


def layout(rng: random.Random, rows: int) -> list[SourceChunk]:
    """Chunks of a (rows, 8) tensor: row shards, some split in two columns, some holding no row, in any order."""
    cuts = sorted({0, rows, *rng.sample(range(1, rows), rng.randint(0, min(12, rows - 1)))})
    chunks = []
    for start, stop in pairwise(cuts):
        widths = [(0, 8)] if rng.random() < 0.6 else [(0, 3), (3, 5)]
        for col, width in widths:
            size = (stop - start, width)
            chunks.append(SourceChunk("w", len(chunks), f"__{len(chunks) % 5}_0.distcp", 0, (start, col), size, 0))
    if rng.random() < 0.2:
        chunks.append(SourceChunk("w", len(chunks), "__0_0.distcp", 0, (rng.randrange(rows), 0), (0, 8), 0))
    chunks = [c._replace(nbytes=math.prod(c.sizes) * 4) for c in chunks]
    rng.shuffle(chunks)
    return chunks


@pytest.mark.parametrize("seed", range(200))
def test_block_parts_match_a_chunk_by_chunk_cut(seed: int) -> None:
    rng = random.Random(seed)
    rows = rng.randint(2, 40)
    chunks = layout(rng, rows)
    readers = {f"__{i}_0.distcp": i for i in range(5)}
    stored = Stored.of(chunks, readers, budget=rng.choice([16, 64, 10**6]))
    first = rng.randrange(rows)
    last = rng.randint(first + 1, rows)
    bounds = sorted({first, last, *rng.sample(range(first, last + 1), rng.randint(0, last - first))})
    blocks = list(pairwise(bounds))
    got = stored.parts(blocks)
    for parts, want in zip(got, reference_parts(chunks, blocks), strict=True):
        assert list(zip(parts.chunks, parts.rows, strict=True)) == want
        assert parts.readers == tuple(readers[c.file] for c, _ in want)
        assert parts.nbytes == tuple(c.nbytes if r is None else c.nbytes // c.sizes[0] * (r[1] - r[0]) for c, r in want)
        slices: dict[int, int] = {}
        for reader, n in zip(parts.readers, parts.nbytes, strict=True):
            slices[reader] = slices.get(reader, 0) + n
        assert parts.slices() == slices and list(parts.slices()) == list(slices)


def test_dcp_chunks_are_built_as_one_by_one() -> None:
    tensors = (TensorMeta("a", "a", (6, 4), torch.bfloat16), TensorMeta("b", "b", (3,), torch.float32))
    files = {"__0_0.distcp": 0, "__1_0.distcp": 1, "x.distcp": None}
    table = {
        "a": (
            StoredChunk(0, (0, 0), (4, 4), "".join(["__0", "_0.distcp"]), 0, 10),
            StoredChunk(1, (4, 0), (2, 4), "__1_0.distcp", 10, 5),
        ),
        "b": (StoredChunk(0, (0,), (3,), "x.distcp", 0, 7),),
    }
    source = DcpSource.__new__(DcpSource)
    source.shared, source.tensors, source.table = DcpShared(tensors, 0, files), tensors, table
    size = {"a": 2, "b": 4}
    want = {
        key: tuple(
            SourceChunk(key, c.index, c.file, files[c.file], c.offsets, c.sizes, math.prod(c.sizes) * size[key])
            for c in chunks
        )
        for key, chunks in table.items()
    }
    got = source.chunks()
    assert got == want
    assert all(type(c) is SourceChunk for cs in got.values() for c in cs)
