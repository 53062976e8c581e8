"""Where ZeRO puts each parameter's elements: pure layout math."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


def zero3_partitioned_numel(numel: int, world_size: int) -> int:
    """Elements of a ZeRO-3 parameter on each rank (zero_to_fp32.zero3_partitioned_param_info)."""
    return math.ceil(numel / world_size)


@dataclass(frozen=True)
class Piece:
    """A run of `numel` elements starting `offset` bytes into checkpoint file number `file`."""

    file: int
    offset: int
    numel: int


@dataclass(frozen=True)
class TensorLayout:
    """Where one tensor's elements are: its pieces, concatenated, are the tensor in row-major order.

    With `stride`, the pieces are instead the span of a strided view (a tensor saved as a view of a larger one).
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    pieces: tuple[Piece, ...]
    stride: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Flat:
    """A 1-D tensor stored contiguously in a checkpoint file: a flat partition, or a ZeRO-3 frozen fragment."""

    file: int
    offset: int
    numel: int
    dtype: torch.dtype


def pieces_of(flats: Sequence[Flat], start: int, count: int) -> list[Piece]:
    """Elements [start, start + count) of the concatenation of `flats`, as pieces. Pure."""
    pieces, base, end = [], 0, start + count
    for flat in flats:
        lo, hi = max(start, base), min(end, base + flat.numel)
        if lo < hi:
            pieces.append(Piece(flat.file, flat.offset + (lo - base) * flat.dtype.itemsize, hi - lo))
        base += flat.numel
        if base >= end:
            break
    if count and base < end:
        raise ValueError(f"elements [{start}, {end}) run past the {base} elements stored")
    return pieces


def zero12_layouts(
    param_shapes: Sequence[Mapping[str, Sequence[int]]],
    partitions: Sequence[Sequence[Flat]],
    alignment_paddings: Sequence[Sequence[int]] | None,
) -> dict[str, TensorLayout]:
    """ZeRO 1/2 trainable parameters. partitions[rank][group] is that rank's fp32 partition of the group. Pure.

    Raises ValueError when the shapes do not account for the partitions (what zero_to_fp32 checks).
    """
    world = len(partitions)
    layouts = {}
    for group, shapes in enumerate(param_shapes):
        flats = [partitions[rank][group] for rank in range(world)]
        available = sum(f.numel for f in flats)
        paddings = alignment_paddings[group] if alignment_paddings is not None else [0] * len(shapes)
        if len(paddings) != len(shapes):
            raise ValueError(f"group {group} has {len(shapes)} parameters but {len(paddings)} alignment paddings")
        offset = 0
        for (name, shape), padding in zip(shapes.items(), paddings, strict=True):
            numel = math.prod(shape)
            layouts[name] = TensorLayout(tuple(shape), flats[0].dtype, tuple(pieces_of(flats, offset, numel)))
            offset += numel + padding
        # Partitions are saved without the group's trailing padding, up to 2 * world elements (zero_to_fp32).
        align = 2 * world
        if math.ceil(offset / align) != math.ceil(available / align):
            raise ValueError(
                f"group {group}: the parameters take {offset} elements but the partitions hold {available}"
            )
    return layouts


def zero3_layouts(param_shapes: Mapping[str, Sequence[int]], partitions: Sequence[Sequence[Flat]]) -> dict:
    """ZeRO 3 trainable parameters. partitions[rank] are that rank's flat groups, in order. Pure.

    Each parameter has ceil(numel / world) elements at the same offset on every rank; the rank parts,
    concatenated, are the parameter followed by padding.
    """
    world = len(partitions)
    lengths = [f.numel for f in partitions[0]]
    for rank, flats in enumerate(partitions):
        if [f.numel for f in flats] != lengths:
            raise ValueError(f"rank {rank}'s flat groups have {[f.numel for f in flats]} elements, rank 0's {lengths}")
    layouts, offset = {}, 0
    for name, shape in param_shapes.items():
        numel = math.prod(shape)
        part = zero3_partitioned_numel(numel, world)
        pieces = []
        for rank in range(world):
            needed = min(part, max(0, numel - rank * part))
            pieces += pieces_of(partitions[rank], offset, needed)
        layouts[name] = TensorLayout(tuple(shape), partitions[0][0].dtype, tuple(pieces))
        offset += part
    if offset != sum(lengths):
        raise ValueError(f"the parameters take {offset} elements per rank but the flat groups hold {sum(lengths)}")
    return layouts


def zero3_fragment_layout(shape: Sequence[int], fragments: Sequence[Flat]) -> TensorLayout:
    """A ZeRO-3 frozen parameter from each rank's padded fragment. Pure."""
    numel, world = math.prod(shape), len(fragments)
    part = zero3_partitioned_numel(numel, world)
    pieces = []
    for rank, fragment in enumerate(fragments):
        needed = min(part, max(0, numel - rank * part))
        if needed > fragment.numel:
            raise ValueError(f"rank {rank}'s fragment has {fragment.numel} elements, {needed} are needed")
        if needed:
            pieces.append(Piece(fragment.file, fragment.offset, needed))
    return TensorLayout(tuple(shape), fragments[0].dtype, tuple(pieces))
