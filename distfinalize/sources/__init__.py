"""Input formats behind one protocol, and the registry that finds the right one.

A Source describes a checkpoint from metadata alone (tensor names, shapes, dtypes) and hands out
readers that fetch only the bytes of the tensors asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import torch


@dataclass(frozen=True)
class TensorMeta:
    """One model tensor of a checkpoint: its storage key, its name inside the model, shape and dtype."""

    key: str
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class SourceChunk(NamedTuple):
    """One stored chunk of a tensor: which file holds it, where it sits in the tensor, its decoded size. (A
    NamedTuple, immutable like a frozen dataclass: rank 0 makes one per stored chunk, millions for the largest
    checkpoints, and builds them in bulk.)"""

    key: str  # the tensor's storage key
    index: int  # the chunk's index among the tensor's chunks
    file: str  # the file (relative to the checkpoint) that holds it
    writer: int | None  # the training rank that saved the file, when its name says
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    nbytes: int  # bytes of the decoded chunk (numel * itemsize)


@dataclass(frozen=True)
class SourceInfo:
    """What was found: format, checkpoint folder, training step and the world size that saved it."""

    format: str
    path: Path
    step: int | None
    saved_world_size: int | None
    skipped: int = 0  # entries that are not model tensors (optimizer state, counters, ...)
    training_dtype: torch.dtype | None = None  # the model's dtype in training, when the checkpoint records it


class TensorReader(Protocol):
    """Reads whole tensors, or blocks of their rows (in their stored dtype, on CPU), touching only the bytes
    they need."""

    def read(self, keys: Sequence[str]) -> dict[str, torch.Tensor]: ...

    def row_cuts(self, key: str) -> Sequence[int] | None: ...  # rows where stored chunks start; None: any row

    def read_rows(self, key: str, start: int, stop: int) -> torch.Tensor: ...


def row_pieces(pieces: Sequence[tuple[tuple[int, ...], tuple[int, ...]]]) -> list[int] | None:
    """row_cuts for a tensor stored in pieces given as (offsets, sizes): None when it is one piece (any rows can be
    read), else the rows where the pieces start. Pure."""
    return None if len(pieces) == 1 else sorted({offsets[0] for offsets, _ in pieces})


def overlapping(offsets: tuple[int, ...], sizes: tuple[int, ...], start: int, stop: int) -> bool:
    """Whether a piece at `offsets` of `sizes` holds any of the rows [start, stop). Pure."""
    return offsets[0] < stop and offsets[0] + sizes[0] > start


def copy_rows(out: torch.Tensor, start: int, offsets: tuple[int, ...], data: torch.Tensor) -> None:
    """Copy the part of a piece (`data`, at `offsets` in the whole tensor) that falls in rows [start, start +
    len(out)) into `out`, which holds those rows of the whole tensor."""
    lo, hi = max(start, offsets[0]), min(start + out.shape[0], offsets[0] + data.shape[0])
    target, source = out.narrow(0, lo - start, hi - lo), data.narrow(0, lo - offsets[0], hi - lo)
    for dim in range(1, out.dim()):
        target = target.narrow(dim, offsets[dim], data.shape[dim])
    target.copy_(source)


class Source(Protocol):
    """A checkpoint opened for finalizing. Runs on: all ranks (metadata only)."""

    info: SourceInfo
    tensors: tuple[TensorMeta, ...]

    def reader(self) -> TensorReader: ...


@dataclass(frozen=True)
class SourceFormat:
    """A registry entry (sources/formats.py): how to recognise a checkpoint folder of this format, how to open
    it, and what its sources can do beyond the Source protocol."""

    name: str
    title: str  # what `inspect` calls it
    detect: Callable[[Path], bool]
    open: Callable[[Path, int | None], Source]  # (checkpoint folder, step) -> Source
    chunked: bool = False  # its sources have chunks(): stored chunks that --strategy exchange can move
    optimizer: bool = False  # its sources have metadata that --keep-optimizer copies the optimizer state from
    fallback: bool = False  # a folder's saved model weights: used only when no sharded checkpoint is there
