"""PyTorch Distributed Checkpoint (DCP) input: FSDP2, torchtitan, Accelerate and plain dcp.save folders.

Metadata comes from DCP's own `.metadata` (read by dcp_metadata.py, which runs none of the pickle's code); tensors
are read chunk by chunk, only the byte ranges each tensor needs, and verified as they are read (distcp.py).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata

from distfinalize.errors import SourceError
from distfinalize.sources import SourceChunk, SourceFormat, SourceInfo, TensorMeta
from distfinalize.sources.dcp_metadata import data_file, load_metadata
from distfinalize.sources.distcp import ChunkError, load_chunk, read_chunk

log = logging.getLogger(__name__)

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
RANK_FILE = re.compile(r"__(\d+)_\d+\.distcp$")


def is_dcp_checkpoint(path: Path) -> bool:
    """A DCP folder has a `.metadata` file next to its `*.distcp` files."""
    return (path / ".metadata").is_file()


class DcpSource:
    """A DCP checkpoint folder, described from its `.metadata` alone. Runs on: all ranks."""

    def __init__(self, path: Path, step: int | None = None) -> None:
        self.path = path
        self.metadata = read_metadata(path)
        try:
            self.tensors, skipped = model_tensors(self.metadata)
            world = saved_world_size(self.metadata)
        except (AttributeError, TypeError, KeyError, ValueError, IndexError) as exc:
            raise SourceError(
                "DCP metadata is malformed",
                where=path / ".metadata",
                hint="the file is corrupt; pick another checkpoint with --checkpoint",
            ) from exc
        if not self.tensors:
            raise SourceError(
                "the checkpoint holds no model tensors",
                where=path / ".metadata",
                hint=f"found only {skipped} optimizer/trainer entries; point SRC at a checkpoint saved with "
                "the model's state dict",
            )
        self.info = SourceInfo("dcp", path, step, world, skipped)
        self.metadata = model_only(self.metadata, {t.key for t in self.tensors})  # the rest was counted: skipped

    def reader(self) -> DcpTensorReader:
        return DcpTensorReader(self.path, self.metadata)

    def chunks(self) -> dict[str, tuple[SourceChunk, ...]]:
        """Every model tensor's stored chunks: file, writer rank, place in the tensor (for --strategy exchange)."""
        return stored_chunks(self.metadata, {t.key for t in self.tensors})


def read_metadata(path: Path) -> Metadata:
    """Load `path/.metadata` safely (dcp_metadata.load_metadata), turning every way it can be broken or hostile
    into one SourceError. Runs on: each rank that opens the checkpoint."""
    return load_metadata(path)


def model_tensors(metadata: Metadata) -> tuple[tuple[TensorMeta, ...], int]:
    """The model tensors of a checkpoint (with container prefixes removed), and how many entries were skipped.

    DCP records each flattened key's path in the original nested dict (`planner_data`), which tells
    `{"model": {...}}` containers apart from model names that merely start with "model.".
    """
    paths = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    tensors, skipped = [], 0
    for key, md in metadata.state_dict_metadata.items():
        name = _model_name(key, paths.get(key))
        if name is None or not isinstance(md, TensorStorageMetadata):
            skipped += 1
            continue
        tensors.append(TensorMeta(key, name, tuple(md.size), md.properties.dtype))
    return tuple(tensors), skipped


def model_only(metadata: Metadata, keys: set[str]) -> Metadata:
    """`metadata` less every entry that is not a model tensor (optimizer and trainer state: counted by
    `model_tensors`, never kept), so a rank holds only the model's chunk table. Pure."""
    paths = metadata.planner_data if isinstance(metadata.planner_data, dict) else None
    return Metadata(
        {k: md for k, md in metadata.state_dict_metadata.items() if k in keys},
        planner_data={k: p for k, p in paths.items() if k in keys} if paths is not None else metadata.planner_data,
        storage_data={i: info for i, info in metadata.storage_data.items() if i.fqn in keys},
        storage_meta=metadata.storage_meta,
    )


def _model_name(key: str, path: object) -> str | None:
    """The tensor's name inside the model, or None when the entry is not part of the model."""
    if isinstance(path, tuple) and len(path) >= 2 and isinstance(path[0], str):
        if path[0] in NON_MODEL_CONTAINERS:
            return None
        if path[0] in MODEL_CONTAINERS and len(path) == 2 and isinstance(path[1], str):
            return path[1]
        return key
    return None if key.split(".", 1)[0] in NON_MODEL_CONTAINERS else key


def stored_chunks(metadata: Metadata, keys: set[str]) -> dict[str, tuple[SourceChunk, ...]]:
    """The chunks of `keys`, from `.metadata`'s chunk list and storage index: linear in the chunks (each chunk's
    place found by its offsets in a dict). Pure."""
    out: dict[str, list[SourceChunk]] = {key: [] for key in keys}
    positions: dict[str, dict[tuple[int, ...], int]] = {}  # per tensor: a chunk's offsets -> its place in the list
    for index, info in (metadata.storage_data or {}).items():
        md = metadata.state_dict_metadata.get(index.fqn)
        if index.fqn not in out or not isinstance(md, TensorStorageMetadata):
            continue
        if index.fqn not in positions:
            positions[index.fqn] = {tuple(c.offsets): i for i, c in enumerate(md.chunks)}
        position = positions[index.fqn][tuple(index.offset)]
        sizes = tuple(md.chunks[position].sizes)
        match = RANK_FILE.search(info.relative_path)
        out[index.fqn].append(
            SourceChunk(
                index.fqn,
                position,
                info.relative_path,
                int(match.group(1)) if match else None,
                tuple(index.offset),
                sizes,
                torch.Size(sizes).numel() * md.properties.dtype.itemsize,
            )
        )
    return {key: tuple(sorted(chunks, key=lambda c: c.index)) for key, chunks in out.items()}


def saved_world_size(metadata: Metadata) -> int | None:
    """How many ranks wrote the checkpoint, from the `__<rank>_<n>.distcp` file names."""
    ranks = set()
    for info in (metadata.storage_data or {}).values():
        match = RANK_FILE.search(getattr(info, "relative_path", ""))
        if match:
            ranks.add(int(match.group(1)))
    return max(ranks) + 1 if ranks else None


class DcpTensorReader:
    """Reads whole tensors, or single chunks, out of a DCP folder: each chunk read once and verified
    (distcp.py). Whole-tensor reads need every chunk of a tensor whole, so DCP's load planner, which
    intersects chunks with the parts a caller wants, has nothing to add here. Runs on: each rank."""

    def __init__(self, path: Path, metadata: Metadata) -> None:
        self.path = path
        self.metadata = metadata

    def read(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """Fetch `keys` (stored dtype, CPU), reading only the chunks they cover. A tensor stored as one chunk
        is a view of the bytes read; the others are put together from their chunks, one chunk held at a time."""
        wanted = [
            SourceChunk(key, i, "", None, tuple(c.offsets), tuple(c.sizes), 0)
            for key in keys
            for i, c in enumerate(self.metadata.state_dict_metadata[key].chunks)
        ]
        out: dict[str, torch.Tensor] = {}
        for number, data in self.load_chunks(wanted):
            chunk = wanted[number]
            md = self.metadata.state_dict_metadata[chunk.key]
            if tuple(data.shape) == tuple(md.size):
                out[chunk.key] = data
                continue
            tensor = out.setdefault(chunk.key, torch.empty(md.size, dtype=md.properties.dtype))
            target = tensor
            for dim, (offset, size) in enumerate(zip(chunk.offsets, chunk.sizes, strict=True)):
                target = target.narrow(dim, offset, size)
            target.copy_(data)
        return out

    def row_cuts(self, key: str) -> list[int]:
        """The rows where `key`'s stored chunks start: `read_rows` reads whole chunks, so blocks end there."""
        return sorted({c.offsets[0] for c in self.metadata.state_dict_metadata[key].chunks if c.offsets})

    def read_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of `key` (stored dtype, CPU), from the chunks that hold them (each read whole and
        verified, as `read` does)."""
        md = self.metadata.state_dict_metadata[key]
        if not md.size:
            return self.read([key])[key]
        wanted = [
            SourceChunk(key, i, "", None, tuple(c.offsets), tuple(c.sizes), 0)
            for i, c in enumerate(md.chunks)
            if c.offsets[0] < stop and c.offsets[0] + c.sizes[0] > start
        ]
        out = torch.empty((stop - start, *md.size[1:]), dtype=md.properties.dtype)
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
            info = (self.metadata.storage_data or {}).get(MetadataIndex(c.key, c.offsets))
            if info is None:
                raise SourceError(
                    "DCP metadata lists a chunk it has no storage entry for",
                    where=self.path / ".metadata",
                    hint=f"{c.key} at {list(c.offsets)}: the file is corrupt",
                )
            located.append((info.relative_path, info.offset, number, info))
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
                    if info.transform_descriptors:
                        raise ChunkError(
                            f"{where}: stored with DCP transforms {list(info.transform_descriptors)}, "
                            "which distfinalize does not read"
                        )
                    md = self.metadata.state_dict_metadata[chunks[number].key]
                    buffer = read_chunk(file, offset, info.length, where)
                    yield number, load_chunk(buffer, where, md.properties.dtype, tuple(chunks[number].sizes))
            finally:
                if file is not None:
                    file.close()

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
            files = sorted(
                {info.relative_path for index, info in self.metadata.storage_data.items() if index.fqn in wanted}
            )
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
