"""PyTorch Distributed Checkpoint (DCP) input: FSDP2, torchtitan, Accelerate and plain dcp.save folders.

Metadata comes from DCP's own `.metadata`; tensors are read with DCP's FileSystemReader, which fetches
only the byte ranges of the chunks each tensor needs.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

from distfinalize.errors import SourceError
from distfinalize.sources import SourceChunk, SourceFormat, SourceInfo, TensorMeta, register_source

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
ZIP_MAGIC = b"PK\x03\x04"
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

    def reader(self) -> DcpTensorReader:
        return DcpTensorReader(self.path, self.metadata)

    def chunks(self) -> dict[str, tuple[SourceChunk, ...]]:
        """Every model tensor's stored chunks: file, writer rank, place in the tensor (for --strategy exchange)."""
        return stored_chunks(self.metadata, {t.key for t in self.tensors})


def read_metadata(path: Path) -> Metadata:
    """Load `.metadata`, turning every way it can be broken into one SourceError."""
    meta_path = path / ".metadata"
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except OSError as exc:
        raise SourceError("cannot read DCP metadata", where=meta_path, hint=str(exc)) from exc
    except Exception as exc:  # a corrupt pickle can raise almost anything
        raise SourceError(
            "DCP metadata is truncated or not a DCP metadata pickle",
            where=meta_path,
            hint="the checkpoint may be incomplete; pick another one with --checkpoint",
        ) from exc
    if not isinstance(metadata, Metadata) or not all(
        isinstance(getattr(metadata, field, None), dict) for field in ("state_dict_metadata", "storage_data")
    ):
        raise SourceError(
            "not a DCP metadata file, or a corrupt one",
            where=meta_path,
            hint="pick another checkpoint with --checkpoint",
        )
    return metadata


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
    """The chunks of `keys`, from `.metadata`'s chunk list and storage index. Pure."""
    out: dict[str, list[SourceChunk]] = {key: [] for key in keys}
    for index, info in (metadata.storage_data or {}).items():
        md = metadata.state_dict_metadata.get(index.fqn)
        if index.fqn not in out or not isinstance(md, TensorStorageMetadata):
            continue
        position = next(i for i, c in enumerate(md.chunks) if tuple(c.offsets) == tuple(index.offset))
        sizes = tuple(md.chunks[position].sizes)
        match = RANK_FILE.search(info.relative_path)
        out[index.fqn].append(SourceChunk(index.fqn, position, info.relative_path,
                                          int(match.group(1)) if match else None, tuple(index.offset), sizes,
                                          torch.Size(sizes).numel() * md.properties.dtype.itemsize))  # fmt: skip
    return {key: tuple(sorted(chunks, key=lambda c: c.index)) for key, chunks in out.items()}


def saved_world_size(metadata: Metadata) -> int | None:
    """How many ranks wrote the checkpoint, from the `__<rank>_<n>.distcp` file names."""
    ranks = set()
    for info in (metadata.storage_data or {}).values():
        match = RANK_FILE.search(getattr(info, "relative_path", ""))
        if match:
            ranks.add(int(match.group(1)))
    return max(ranks) + 1 if ranks else None


class VerifiedFileSystemReader(FileSystemReader):
    """DCP's reader, checking each tensor chunk before DCP copies it into place: its full length is there,
    the CRC-32s torch.save records in the chunk's zip records match, and it holds the dtype and shape
    `.metadata` says (DCP itself would cast a mismatched dtype silently). Flipped, missing or misplaced
    bytes are an error, never a silently wrong tensor. Runs on: each rank, for the chunks it reads."""

    def __init__(self, path: str, metadata: Metadata) -> None:
        super().__init__(path)
        self.expected: dict[tuple[str, int], tuple[torch.dtype, tuple[int, ...]]] = {}
        for index, info in (metadata.storage_data or {}).items():
            md = metadata.state_dict_metadata.get(index.fqn)
            if isinstance(md, TensorStorageMetadata) and index.index is not None and index.index < len(md.chunks):
                sizes = tuple(md.chunks[index.index].sizes)
                self.expected[(info.relative_path, info.offset)] = (md.properties.dtype, sizes)

    def _slice_file(self, file, sinfo):  # FileSystemReader's own hook
        file.seek(sinfo.offset)
        data = file.read(sinfo.length)
        where = f"{sinfo.relative_path} bytes {sinfo.offset}-{sinfo.offset + sinfo.length}"
        if len(data) != sinfo.length:
            raise ChunkError(f"{where}: the file ends after {len(data)} of {sinfo.length} bytes (truncated)")
        expected = self.expected.get((sinfo.relative_path, sinfo.offset))
        if expected is not None:
            check_tensor_chunk(data, where, *expected)
        return io.BytesIO(data)


def check_tensor_chunk(data: bytes, where: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    """A tensor chunk is a torch.save zip whose records pass their CRC-32 and whose tensor matches .metadata."""
    if data[:4] != ZIP_MAGIC:
        raise ChunkError(f"{where}: not a torch.save record")
    verify_zip_chunk(data, where)
    try:
        tensor = torch.load(io.BytesIO(data), map_location="meta", weights_only=True)  # header only, no bytes
    except Exception as exc:  # any failure to load the verified record is corruption of its contents
        raise ChunkError(f"{where}: the record does not load ({type(exc).__name__})") from exc
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != dtype or tuple(tensor.shape) != shape:
        found = f"{tensor.dtype} {list(tensor.shape)}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ChunkError(f"{where}: holds {found} where .metadata says {dtype} {list(shape)}")


class ChunkError(ValueError):
    """A checkpoint chunk is truncated or fails its checksum."""


def verify_zip_chunk(data: bytes, where: str) -> None:
    """Check every record of a torch.save zip chunk against its CRC-32."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, ValueError, OSError) as exc:
        raise ChunkError(f"{where}: not a readable torch.save record ({exc})") from exc
    if bad is not None:
        raise ChunkError(f"{where}: checksum mismatch in record {bad!r} (the file is corrupt)")


class DcpTensorReader:
    """Reads whole tensors out of a DCP folder through DCP's FileSystemReader. Runs on: each rank."""

    def __init__(self, path: Path, metadata: Metadata) -> None:
        self.path = path
        self.metadata = metadata
        self.storage = VerifiedFileSystemReader(str(path), metadata)
        self.storage.set_up_storage_reader(metadata, True)

    def read(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """Fetch `keys` (stored dtype, CPU), reading only the chunks they cover."""
        out: dict[str, torch.Tensor] = {}
        for key in keys:
            md = self.metadata.state_dict_metadata[key]
            out[key] = torch.empty(md.size, dtype=md.properties.dtype)
        planner = DefaultLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False)
        planner.set_up_planner(out, self.metadata, True)
        with self._read_errors(keys):
            plan = self.storage.prepare_local_plan(planner.create_local_plan())
            plan = planner.finish_plan(self.storage.prepare_global_plan([plan])[0])
            self.storage.read_data(plan, planner).wait()
        return out

    def read_chunks(self, chunks: Sequence[SourceChunk]) -> list[torch.Tensor]:
        """The stored chunks themselves (stored dtype, CPU, contiguous), in order, verified like `read`."""
        out, items = [], []
        for c in chunks:
            dtype = self.metadata.state_dict_metadata[c.key].properties.dtype
            out.append(torch.empty(c.sizes, dtype=dtype))
            index = MetadataIndex(c.key, c.offsets, c.index)
            zeros = torch.Size([0] * len(c.sizes))
            items.append(ReadItem(LoadItemType.TENSOR, index, zeros, index, zeros, torch.Size(c.sizes)))
        with self._read_errors([c.key for c in chunks]):
            self.storage.read_data(LoadPlan(items), ChunkPlanner(dict(zip(items, out, strict=True)))).wait()
        return out

    @contextlib.contextmanager
    def _read_errors(self, keys: Sequence[str]) -> Iterator[None]:
        """Every way a read can fail, as one SourceError naming the files."""
        try:
            yield
        except (KeyboardInterrupt, SystemExit):
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
            raise SourceError(
                f"cannot read {len(keys)} tensor(s) starting with {keys[0]!r}",
                where=f"{self.path} ({', '.join(files[:4])}{' ...' if len(files) > 4 else ''})",
                hint=f"the .distcp files may be truncated or corrupt ({type(exc).__name__}: {exc})",
            ) from exc


class ChunkPlanner:
    """The three planner calls FileSystemReader.read_data makes, landing each chunk in its own tensor."""

    def __init__(self, targets: dict[ReadItem, torch.Tensor]) -> None:
        self.targets = targets

    def resolve_tensor(self, item: ReadItem) -> torch.Tensor:
        return self.targets[item]

    def commit_tensor(self, item: ReadItem, tensor: torch.Tensor) -> None:
        pass

    def load_bytes(self, item: ReadItem, value: io.BytesIO) -> None:
        raise ChunkError(f"{item.storage_index.fqn}: a bytes entry where a tensor chunk was expected")


register_source(SourceFormat("dcp", is_dcp_checkpoint, DcpSource))
