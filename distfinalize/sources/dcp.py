"""PyTorch Distributed Checkpoint (DCP) input: FSDP2, torchtitan, Accelerate and plain dcp.save folders.

Metadata comes from DCP's own `.metadata` (read by dcp_metadata.py, which runs none of the pickle's code); tensors
are read chunk by chunk, only the byte ranges each tensor needs, and verified as they are read (distcp.py).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from functools import partial
from itertools import repeat
from operator import itemgetter, mul
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from distfinalize.errors import SourceError
from distfinalize.sources import SourceChunk, SourceFormat, SourceInfo, TensorMeta
from distfinalize.sources.dcp_metadata import data_file, load_metadata
from distfinalize.sources.dcp_table import ChunkTable, DcpShared, StoredChunk, read_table
from distfinalize.sources.distcp import TAIL_BYTES, ChunkError, load_chunk, read_chunk, stored_crc

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import Metadata

log = logging.getLogger(__name__)

_INDEX, _OFFSETS, _SIZES, _FILE = (
    itemgetter(StoredChunk._fields.index(f)) for f in ("index", "offsets", "sizes", "file")
)
_NEW_CHUNK = partial(tuple.__new__, SourceChunk)  # SourceChunk from a tuple of its fields, without Python code

# Top-level keys of nested saves ({"model": ..., "optim": ...}) that hold model tensors, and ones that never do.
MODEL_CONTAINERS = frozenset({"model", "module", "models", "state_dict", "model_state_dict"})
NON_MODEL_CONTAINERS = frozenset(
    {
        "optim",
        "optimizer",
        "optimizers",
        "optimizer_state",
        "optim_state",
        "lr_scheduler",
        "lr_schedulers",
        "scheduler",
        "dataloader",
        "train_state",
        "trainer_state",
        "rng",
        "rng_state",
        "rng_states",
    }
)


def is_dcp_checkpoint(path: Path) -> bool:
    """A DCP folder has a `.metadata` file next to its `*.distcp` files."""
    return (path / ".metadata").is_file()


class DcpSource:
    """A DCP checkpoint folder, described from its `.metadata` alone.

    Opened from the folder, it reads `.metadata` (dcp_table.model_table) and holds the whole model's chunk table;
    opened from `shared` (what that rank broadcast), it holds no chunks until `install` gives it its own.
    Runs on: the rank that reads `.metadata` (rank 0 under the pipeline, or a single process); the others open it
    from `shared`."""

    def __init__(self, path: Path, step: int | None = None, shared: DcpShared | None = None) -> None:
        self.path = path
        self.table: ChunkTable = {}
        if shared is None:
            shared, self.table = read_table(path, _model_name)
        if not shared.tensors:
            raise SourceError(
                "the checkpoint holds no model tensors",
                where=path / ".metadata",
                hint=f"found only {shared.skipped} optimizer/trainer entries; point SRC at a checkpoint saved with "
                "the model's state dict",
            )
        self.shared = shared
        self.tensors = shared.tensors
        self.info = SourceInfo("dcp", path, step, shared.saved_world_size, shared.skipped)

    def install(self, table: ChunkTable) -> None:
        """Add chunk lists (this rank's part of the table, from the rank that read `.metadata`)."""
        self.table.update(table)

    def reader(self) -> DcpTensorReader:
        return DcpTensorReader(self.path, self.table, {t.key: t for t in self.tensors})

    def files(self) -> Mapping[str, int | None]:
        """Every data file holding model chunks -> the training rank that wrote it (the same on every rank)."""
        return self.shared.files

    def chunks(self) -> dict[str, tuple[SourceChunk, ...]]:
        """The stored chunks this rank holds (every model tensor's on the rank that read `.metadata`): file,
        writer rank, place in the tensor (for --strategy exchange and the tie check)."""
        itemsizes = {t.key: t.dtype.itemsize for t in self.tensors}
        writer = self.shared.files.__getitem__
        named = {name: name for name in self.shared.files}.__getitem__  # one str per file: later lookups find it
        out = {}
        for key, chunks in self.table.items():  # each tensor's chunks built a column at a time, at C speed
            names, sizes = list(map(named, map(_FILE, chunks))), list(map(_SIZES, chunks))
            nbytes = map(mul, map(math.prod, sizes), repeat(itemsizes[key]))
            columns = zip(
                repeat(key), map(_INDEX, chunks), names, map(writer, names), map(_OFFSETS, chunks), sizes, nbytes
            )
            out[key] = tuple(map(_NEW_CHUNK, columns))
        return out


def read_metadata(path: Path) -> Metadata:
    """`path/.metadata` as DCP's own objects, safely (dcp_metadata.load_metadata): for inspect, breakdown and
    --keep-optimizer. Runs on: each rank that opens the checkpoint that way."""
    return load_metadata(path)


def model_tensors(metadata: Metadata) -> tuple[tuple[TensorMeta, ...], int]:
    """The model tensors of a checkpoint (with container prefixes removed), and how many entries were skipped.

    DCP records each flattened key's path in the original nested dict (`planner_data`), which tells
    `{"model": {...}}` containers apart from model names that merely start with "model.".
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    paths = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    tensors, skipped = [], 0
    for key, md in metadata.state_dict_metadata.items():
        name = _model_name(key, paths.get(key))
        if name is None or not isinstance(md, TensorStorageMetadata):
            skipped += 1
            continue
        tensors.append(TensorMeta(key, name, tuple(md.size), md.properties.dtype))
    return tuple(tensors), skipped


def _model_name(key: str, path: object) -> str | None:
    """The tensor's name inside the model, or None when the entry is not part of the model."""
    if isinstance(path, tuple) and len(path) >= 2 and isinstance(path[0], str):
        if path[0] in NON_MODEL_CONTAINERS:
            return None
        if path[0] in MODEL_CONTAINERS and len(path) == 2 and isinstance(path[1], str):
            return path[1]
        return key
    return None if key.split(".", 1)[0] in NON_MODEL_CONTAINERS else key


class DcpTensorReader:
    """Reads whole tensors, or single chunks, out of a DCP folder: each chunk read once and verified
    (distcp.py). Whole-tensor reads need every chunk of a tensor whole, so DCP's load planner, which
    intersects chunks with the parts a caller wants, has nothing to add here. Runs on: each rank, for the tensors
    whose chunks it holds (`table`)."""

    def __init__(self, path: Path, table: Mapping[str, tuple[StoredChunk, ...]], tensors: Mapping[str, TensorMeta]):
        self.path = path
        self.table = table
        self.tensors = tensors
        self._places: dict[str, dict[tuple[int, ...], StoredChunk]] = {}

    def stored(self, key: str) -> tuple[StoredChunk, ...]:
        """`key`'s chunks, as this rank was given them."""
        try:
            return self.table[key]
        except KeyError:
            raise SourceError(
                f"no chunk list for {key!r} on this rank",
                where=self.path / ".metadata",
                hint="distfinalize shares each rank only the chunks its plan reads; this is a bug, please report it",
            ) from None

    def read(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """Fetch `keys` (stored dtype, CPU), reading only the chunks they cover. A tensor stored as one chunk
        is a view of the bytes read; the others are put together from their chunks, one chunk held at a time."""
        wanted = [SourceChunk(key, c.index, "", None, c.offsets, c.sizes, 0) for key in keys for c in self.stored(key)]
        out: dict[str, torch.Tensor] = {}
        for number, data in self.load_chunks(wanted):
            chunk = wanted[number]
            meta = self.tensors[chunk.key]
            if tuple(data.shape) == meta.shape:
                out[chunk.key] = data
                continue
            tensor = out.setdefault(chunk.key, torch.empty(meta.shape, dtype=meta.dtype))
            target = tensor
            for dim, (offset, size) in enumerate(zip(chunk.offsets, chunk.sizes, strict=True)):
                target = target.narrow(dim, offset, size)
            target.copy_(data)
        return out

    def row_cuts(self, key: str) -> list[int]:
        """The rows where `key`'s stored chunks start: `read_rows` reads whole chunks, so blocks end there."""
        return sorted({c.offsets[0] for c in self.stored(key) if c.offsets})

    def read_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of `key` (stored dtype, CPU), from the chunks that hold them (each read whole and
        verified, as `read` does); the chunk itself, not a copy, when the rows are exactly one stored chunk."""
        meta = self.tensors[key]
        if not meta.shape:
            return self.read([key])[key]
        wanted = [
            SourceChunk(key, c.index, "", None, c.offsets, c.sizes, 0)
            for c in self.stored(key)
            if c.offsets[0] < stop and c.offsets[0] + c.sizes[0] > start
        ]
        if len(wanted) == 1 and exactly(wanted[0], start, stop, meta.shape):
            [(_, data)] = list(self.load_chunks(wanted))
            return data  # a view of the verified record: no copy
        out = torch.empty((stop - start, *meta.shape[1:]), dtype=meta.dtype)
        for number, data in self.load_chunks(wanted):
            chunk = wanted[number]
            lo, hi = max(start, chunk.offsets[0]), min(stop, chunk.offsets[0] + chunk.sizes[0])
            target = out.narrow(0, lo - start, hi - lo)
            for dim, (offset, size) in enumerate(zip(chunk.offsets[1:], chunk.sizes[1:], strict=True), start=1):
                target = target.narrow(dim, offset, size)
            target.copy_(data.narrow(0, lo - chunk.offsets[0], hi - lo))
        return out

    def read_chunks(self, chunks: Sequence[SourceChunk]) -> list[torch.Tensor]:
        """The stored chunks themselves (stored dtype, CPU, contiguous), in order, verified like `read`."""
        out: list[torch.Tensor] = [torch.empty(0)] * len(chunks)
        for number, data in self.load_chunks(chunks):
            out[number] = data
        return out

    def load_chunks(self, chunks: Sequence[SourceChunk]) -> Iterator[tuple[int, torch.Tensor]]:
        """(position in `chunks`, verified tensor) for each chunk, read file by file in offset order: the caller
        holds only the chunks it keeps."""
        located = []
        for number, c in enumerate(chunks):
            info = self._place(c)
            located.append((info.file, info.offset, number, info))
        files = {relative: data_file(self.path, relative) for relative, *_ in located}  # inside the checkpoint
        with self._read_errors([c.key for c in chunks]):
            file, opened = None, None
            try:
                for relative, offset, number, info in sorted(located, key=lambda x: x[:3]):
                    if relative != opened:
                        if file is not None:
                            file.close()
                        file, opened = open(files[relative], "rb", buffering=0), relative  # noqa: SIM115
                    where = f"{relative} bytes {offset}-{offset + info.length}"
                    if info.transforms:
                        raise ChunkError(
                            f"{where}: stored with DCP transforms {list(info.transforms)}, "
                            "which distfinalize does not read"
                        )
                    dtype = self.tensors[chunks[number].key].dtype
                    buffer = read_chunk(file, offset, info.length, where)
                    yield number, load_chunk(buffer, where, dtype, tuple(chunks[number].sizes))
            finally:
                if file is not None:
                    file.close()

    def stored_crcs(self, chunks: Sequence[SourceChunk]) -> list[int | None]:
        """Per chunk, the CRC-32 its record stores for its data (`distcp.stored_crc`), from the record's last
        TAIL_BYTES alone; None where they do not tell. Chunks whose CRCs differ hold different data; equal ones
        must still be read to be compared."""
        crcs: list[int | None] = []
        with self._read_errors([c.key for c in chunks]):
            for c in chunks:
                info = self._place(c)
                if info.transforms:
                    crcs.append(None)
                    continue
                tail = min(info.length, TAIL_BYTES)
                start = info.offset + info.length - tail
                with open(data_file(self.path, info.file), "rb", buffering=0) as file:
                    data = read_chunk(file, start, tail, f"{info.file} bytes {start}-{start + tail}")
                nbytes = math.prod(c.sizes) * self.tensors[c.key].dtype.itemsize
                crcs.append(stored_crc(memoryview(data.numpy()), info.length, nbytes))
        return crcs

    def _place(self, chunk: SourceChunk) -> StoredChunk:
        """Where `chunk` is stored, from this rank's chunk lists."""
        if chunk.key not in self._places:
            self._places[chunk.key] = {s.offsets: s for s in self.stored(chunk.key)}
        info = self._places[chunk.key].get(tuple(chunk.offsets))
        if info is None:
            raise SourceError(
                f"no chunk of {chunk.key!r} at {list(chunk.offsets)} on this rank",
                where=self.path / ".metadata",
                hint="distfinalize shares each rank only the chunks it reads; this is a bug, please report it",
            )
        return info

    @contextlib.contextmanager
    def _read_errors(self, keys: Sequence[str]) -> Iterator[None]:
        """Every way a read can fail, as one SourceError naming the files."""
        try:
            yield
        except (KeyboardInterrupt, SystemExit, GeneratorExit):  # GeneratorExit: a reader of `load_chunks` stopped early
            raise
        except ChunkError as exc:
            raise SourceError(
                "a checkpoint file is corrupt",
                where=f"{self.path}/{exc}",
                hint="finalize another checkpoint with --checkpoint, or restore this one",
            ) from exc
        except FileNotFoundError as exc:
            raise SourceError(
                "a checkpoint file is missing",
                where=exc.filename,
                hint="the checkpoint is incomplete; finalize another one with --checkpoint",
            ) from exc
        except BaseException as exc:  # DCP raises CheckpointException, a BaseException
            wanted = set(keys)
            files = sorted({c.file for key in wanted for c in self.table.get(key, ())})
            hint = f"the .distcp files may be truncated or corrupt ({type(exc).__name__}: {exc})"
            denied = _permission_error(exc)
            if denied is not None:  # not corruption: say so, and what to do
                hint = f"permission denied ({denied.filename or denied}); run as a user who can read it, or fix its "
                hint += "permissions"
            raise SourceError(
                f"cannot read {len(keys)} tensor(s) starting with {keys[0]!r}",
                where=f"{self.path} ({', '.join(files[:4])}{' ...' if len(files) > 4 else ''})",
                hint=hint,
            ) from exc


def exactly(chunk: SourceChunk, start: int, stop: int, shape: tuple[int, ...]) -> bool:
    """Whether `chunk` holds rows [start, stop) of a tensor of `shape` whole, and nothing else. Pure."""
    return chunk.offsets[0] == start and chunk.sizes[0] == stop - start and tuple(chunk.sizes[1:]) == tuple(shape[1:])


def _permission_error(exc: BaseException) -> PermissionError | None:
    """The PermissionError behind a read failure (raised as is, chained, or one of DCP's per-rank failures)."""
    todo, seen = [exc], set()
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, PermissionError):
            return current
        failures = getattr(current, "failures", None)
        if isinstance(failures, dict):
            todo += [f for f in failures.values() if isinstance(f, BaseException)]
        todo += [e for e in (current.__cause__, current.__context__) if e is not None]
    return None


DCP_FORMAT = SourceFormat(
    "dcp", "DCP (torch.distributed.checkpoint)", is_dcp_checkpoint, DcpSource, chunked=True, optimizer=True
)
