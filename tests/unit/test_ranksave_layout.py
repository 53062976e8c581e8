"""The per-rank file layout math (sources/ranksave.py) against torch.distributed.tensor's own rule for where a
DTensor's local piece lies, on uneven shapes, 1-D and 2-D meshes, sharded and replicated dims."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

from distfinalize.sources.ranksave import Stored, chunk_of, pieces

SHAPES = [(7,), (5, 3), (2, 9), (1, 4), (0, 3), (64, 160)]
MESHES = [(1,), (2,), (3,), (4,), (2, 2), (3, 2), (2, 3)]


def torch_placements(kinds):
    return [Shard(d) if kind == "shard" else Replicate() for kind, d in kinds]


def placement_choices(ndim: int, mesh_ndim: int):
    options = [("replicate", -1)] + [("shard", d) for d in range(ndim)]
    return itertools.product(options, repeat=mesh_ndim)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mesh", MESHES)
def test_chunk_of_matches_torch(shape: tuple[int, ...], mesh: tuple[int, ...]) -> None:
    """Every placement of every mesh dim (two mesh dims may shard the same tensor dim), every coordinate."""
    for kinds in placement_choices(len(shape), len(mesh)):
        for coordinate in itertools.product(*(range(n) for n in mesh)):
            want = _compute_local_shape_and_global_offset(shape, mesh, list(coordinate), torch_placements(kinds))
            offsets, sizes = chunk_of(shape, mesh, coordinate, kinds)
            assert sizes == tuple(want[0]), (shape, mesh, kinds, coordinate)
            if all(sizes):  # an empty piece is never read; torch places it anywhere past the data
                assert offsets == tuple(want[1]), (shape, mesh, kinds, coordinate)


@pytest.mark.parametrize("shape", [(7, 3), (64, 160), (3,)])
@pytest.mark.parametrize("mesh", [(2,), (3,), (2, 3)])
def test_pieces_cover_the_tensor_once(shape: tuple[int, ...], mesh: tuple[int, ...]) -> None:
    """The pieces chosen tile the tensor exactly once, from the first replica in mesh order."""
    ranks = tuple(range(1, 1 + torch.Size(mesh).numel()))
    for kinds in placement_choices(len(shape), len(mesh)):
        stored = Stored(shape, torch.float32, tuple(kinds), (mesh, ranks))
        cover = torch.zeros(shape, dtype=torch.int32)
        for piece in pieces(stored, own_rank=0):
            target = cover
            for dim, (start, size) in enumerate(zip(piece.offsets, piece.sizes, strict=True)):
                target = target.narrow(dim, start, size)
            target += 1
        assert torch.equal(cover, torch.ones(shape, dtype=torch.int32)), kinds
        replicated = [i for i, (kind, _) in enumerate(kinds) if kind == "replicate"]
        grid = torch.tensor(ranks).reshape(mesh)
        for piece in pieces(stored, own_rank=0):
            coordinate = [int(c) for c in (grid == piece.rank).nonzero()[0]]
            assert all(coordinate[i] == 0 for i in replicated)


def test_plain_tensor_is_read_whole_from_its_own_file() -> None:
    stored = Stored((4, 2), torch.float32, (), None)
    assert [(p.rank, p.offsets, p.sizes) for p in pieces(stored, own_rank=0)] == [(0, (0, 0), (4, 2))]
