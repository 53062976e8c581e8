"""A checkpoint of per-rank `torch.save` files (ranksave.py) as a Source, and its reader.

The plan comes from rank 0's file alone. A reader reads, for each tensor asked for, the pieces the saving
ranks hold (ranksave.pieces: one copy of each, replicas skipped), parsing each file's pickle the first time it
needs a piece from it and keeping only two integers per entry of that file (byte offset and element count).
Every piece is checked against the layout rank 0's file describes, so files of different saves are caught.
Runs on: all ranks (metadata), each rank for its own tensors (reads).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

import torch

from distfinalize.errors import SourceError
from distfinalize.sources import SourceInfo, TensorMeta, copy_rows, overlapping, row_pieces
from distfinalize.sources.fileread import read_exact, stored_offset
from distfinalize.sources.ranksave import (
    Piece,
    Stored,
    chunk_of,
    coordinate_of,
    describe,
    load_rank_file,
    local_of,
    pieces,
    saved_by,
)

log = logging.getLogger(__name__)

MAX_SHOWN = 4


def files_in_rank_order(
    path: Path, world: int, found: dict[int, Path], name_of: Callable[[int], str], hint: str
) -> tuple[Path, ...]:
    """`found[r]` for r in 0..world-1; refuses a missing rank, naming up to MAX_SHOWN of the missing files
    (`name_of(r)`), and a rank outside the world size. Pure check. Runs on: all ranks."""
    missing = sorted(set(range(world)) - found.keys())
    if missing:
        shown = ", ".join(name_of(r) for r in missing[:MAX_SHOWN])
        more = ", ..." if len(missing) > MAX_SHOWN else ""
        raise SourceError(
            f"{len(missing)} of {world} rank files missing ({shown}{more})",
            where=path,
            hint=f"a rank did not finish saving; {hint}",
        )
    extra = sorted(r for r in found if r >= world)
    if extra:
        raise SourceError(
            f"rank file {name_of(extra[0])} names a rank outside world size {world}",
            where=path,
            hint=f"the folder mixes files of different saves; {hint}",
        )
    return tuple(found[r] for r in range(world))


class RankFilesSource:
    """Per-rank files (`files[r]` saved by rank r), described from rank 0's file. Runs on: all ranks."""

    def __init__(self, path: Path, files: tuple[Path, ...], fmt: str, step: int | None, hint: str) -> None:
        self.path = path
        self.files = files
        self.hint = hint
        state = load_rank_file(files[0], hint)
        self.stored: dict[str, Stored] = {}
        skipped, meshes = 0, {}
        for key, value in state.items():
            stored = describe(value, files[0], str(key), meshes) if isinstance(key, str) else None
            if stored is None:
                skipped += 1
                continue
            self.stored[key] = stored
        if not self.stored:
            raise SourceError("the checkpoint file holds no tensors", where=files[0], hint=hint)
        _check_mesh(self.stored, files)
        self.tensors = tuple(TensorMeta(k, k, s.shape, s.dtype) for k, s in self.stored.items())
        self.info = SourceInfo(fmt, path, step, len(files), skipped)
        log.debug("%s checkpoint saved by %d rank(s): %d tensors", fmt, len(files), len(self.tensors))

    def reader(self) -> RankFilesReader:
        return RankFilesReader(self.files, self.stored, self.hint)


def _check_mesh(stored: dict[str, Stored], files: tuple[Path, ...]) -> None:
    """Every DTensor's device mesh must hold exactly the ranks whose files are there; a ShardedTensor's shards
    must lie in those files and tile the tensor."""
    world, checked = len(files), set()
    for key, s in stored.items():
        if s.mesh is not None and id(s.mesh) in checked:
            continue
        if s.listed is not None:
            outside = sorted({p.rank for p in s.listed if not 0 <= p.rank < world})
            covered = sum(math.prod(p.sizes) for p in pieces(s, 0))
            if s.world not in (None, world) or outside or covered != math.prod(s.shape):
                what = f"shards of {covered} of its {math.prod(s.shape)} elements"
                what = f"a shard on rank {outside[0]}" if outside else what
                what = f"a save by {s.world} ranks" if s.world not in (None, world) else what
                raise SourceError(
                    f"tensor {key!r} records {what}, but {world} rank files are here",
                    where=files[0],
                    hint="the folder mixes files of different saves, or some are missing; finalize another checkpoint",
                )
            continue
        if s.mesh is not None:
            checked.add(id(s.mesh))
        if s.mesh is not None and sorted(s.mesh[1]) != list(range(world)):
            shape = "x".join(map(str, s.mesh[0]))
            raise SourceError(
                f"tensor {key!r} was saved on a device mesh of {shape} ranks, but {world} rank files are here",
                where=files[0],
                hint="the folder mixes files of different saves, or some are missing; finalize another checkpoint",
            )


class RankFilesReader:
    """Reads whole tensors from the pieces in the rank files, by positioned reads. Runs on: each rank."""

    def __init__(self, files: tuple[Path, ...], stored: dict[str, Stored], hint: str) -> None:
        self.files = files
        self.stored = stored
        self.hint = hint
        self.located: dict[int, dict[str, tuple[int, int]]] = {}  # rank -> key -> (byte offset, numel)

    def read(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """Fetch `keys` (stored dtype, CPU); files are opened for this call only."""
        out: dict[str, torch.Tensor] = {}
        with ExitStack() as stack:
            handles: dict[int, object] = {}
            for key in keys:
                stored = self.stored[key]
                parts = pieces(stored, 0)
                if len(parts) == 1:
                    out[key] = self._read_piece(key, parts[0], handles, stack)
                    continue
                tensor = torch.empty(stored.shape, dtype=stored.dtype)
                for piece in parts:
                    target = tensor
                    for dim, (start, size) in enumerate(zip(piece.offsets, piece.sizes, strict=True)):
                        target = target.narrow(dim, start, size)
                    target.copy_(self._read_piece(key, piece, handles, stack))
                out[key] = tensor
        return out

    def row_cuts(self, key: str) -> list[int] | None:
        """The rows where the tensor's pieces start (rows are read a piece at a time)."""
        parts = pieces(self.stored[key], 0)
        return row_pieces([(p.offsets, p.sizes) for p in parts]) or [0]

    def read_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of `key` (stored dtype, CPU), from the pieces that hold them."""
        stored = self.stored[key]
        if not stored.shape:
            return self.read([key])[key]
        out = torch.empty((stop - start, *stored.shape[1:]), dtype=stored.dtype)
        with ExitStack() as stack:
            handles: dict[int, object] = {}
            for piece in pieces(stored, 0):
                if overlapping(piece.offsets, piece.sizes, start, stop):
                    copy_rows(out, start, piece.offsets, self._read_piece(key, piece, handles, stack))
        return out

    def _read_piece(self, key: str, piece: Piece, handles: dict[int, object], stack: ExitStack) -> torch.Tensor:
        """One piece of `key`, read from its rank's file with a positioned read of just its bytes."""
        offset, numel = self._locate(piece.rank)[key]
        path = self.files[piece.rank]
        data = torch.empty(piece.sizes, dtype=self.stored[key].dtype)
        if not numel:
            return data
        if piece.rank not in handles:
            handles[piece.rank] = stack.enter_context(open(path, "rb", buffering=0))  # noqa: SIM115
        try:
            read_exact(handles[piece.rank], offset, memoryview(data.view(torch.uint8).numpy()).cast("B"), path)
        except OSError as exc:
            hint = f"the file may be truncated or unreadable ({exc}); {self.hint}"
            raise SourceError(f"cannot read tensor {key!r}", where=path, hint=hint) from exc
        return data

    def _locate(self, rank: int) -> dict[str, tuple[int, int]]:
        """Where each entry's piece lies in rank `rank`'s file, checked against rank 0's layout."""
        if rank in self.located:
            return self.located[rank]
        path = self.files[rank]
        state = load_rank_file(path, self.hint)
        found: dict[str, tuple[int, int]] = {}
        meshes: dict[int, tuple] = {}
        for key, expected in self.stored.items():
            value = state.get(key)
            stored = describe(value, path, key, meshes) if value is not None else None
            if stored is None or stored.shape != expected.shape or stored.dtype != expected.dtype:
                raise _mismatch(key, path, "is missing" if stored is None else "differs from rank 0's")
            if stored != expected:
                raise _mismatch(key, path, "is split differently from rank 0's")
            saver = saved_by(value)
            if saver is not None and saver != rank:
                raise _mismatch(key, path, f"was saved by rank {saver}, but the file name says rank {rank}")
            local, want = local_of(value), _own_sizes(stored, rank)
            if local is None and 0 in want:  # a ShardedTensor rank with nothing of this tensor
                found[key] = (0, 0)
                continue
            if local is None or tuple(local.shape) != want:
                have = "no piece" if local is None else f"a piece of shape {list(local.shape)}"
                raise _mismatch(key, path, f"holds {have}, not one of shape {list(want)}")
            if local.numel() > 1 and not local.is_contiguous():
                raise SourceError(f"tensor {key!r} is stored non-contiguous", where=path, hint=self.hint)
            found[key] = (stored_offset(local, path) if local.numel() else 0, local.numel())
        self.located[rank] = found
        return found


def _own_sizes(stored: Stored, rank: int) -> tuple[int, ...]:
    """The shape of the piece `rank` saved (the whole tensor for a plain one)."""
    if stored.listed is not None:
        return next((p.sizes for p in stored.listed if p.rank == rank), (0,) * len(stored.shape))
    if stored.mesh is None:
        return stored.shape
    coordinate = coordinate_of(stored.mesh, rank)
    if coordinate is None:
        return (0,) * len(stored.shape)
    return chunk_of(stored.shape, stored.mesh[0], coordinate, stored.placements)[1]


def _mismatch(key: str, path: Path, what: str) -> SourceError:
    return SourceError(
        f"tensor {key!r} {what}",
        where=path,
        hint="the folder mixes rank files of different saves (steps, world sizes or models); finalize another "
        "checkpoint",
    )
