"""A DCP checkpoint's `.metadata`, loaded without running the checkpoint's code, and the data files it names.

`.metadata` is a pickle, and a pickle can call anything it names. DCP's own reader (`FileSystemReader`) loads it
with plain `pickle.load`, and torch's weights-only unpickler refuses DCP's dataclasses, so it is read here by an
unpickler that resolves only the globals real DCP metadata holds: the dataclasses and enum of
`torch.distributed.checkpoint.metadata`, the filesystem writer's `_StorageInfo`, `torch.Size`, torch dtypes,
layouts and memory formats, the `pathlib` path a checkpoint id may be, and a few builtin containers. They were
found by listing the globals of metadata saved by FSDP2 (with and without the optimizer), FSDP1 (ShardedTensor),
Accelerate, peft LoRA under FSDP2, plain `dcp.save` of DTensors and of every kind of value a state dict can
hold (tests/trust/test_trust_metadata.py loads them all both ways). Anything else is refused by name.

The files the storage index names are taken only as DCP's FileSystemWriter writes them (`__<rank>_<n>.distcp`,
a bare name) and opened only inside the checkpoint folder. Runs on: every rank that reads metadata.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import pathlib
import pickle
import re
from collections import OrderedDict
from collections.abc import Iterator
from operator import attrgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from distfinalize.errors import SourceError

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import Metadata

METADATA_FILE = ".metadata"
# FileSystemWriter's names: f"{prefix}{file_count}.distcp" with prefix f"__{rank}_" (no leading zeros, no path).
DATA_FILE = re.compile(r"__(0|[1-9]\d*)_(0|[1-9]\d*)\.distcp")

_DCP_CLASSES = (
    "Metadata",
    "MetadataIndex",
    "ChunkStorageMetadata",
    "TensorStorageMetadata",
    "BytesStorageMetadata",
    "TensorProperties",
    "StorageMeta",
    "_MEM_FORMAT_ENCODING",
)
_TORCH_VALUES = (torch.dtype, torch.layout, torch.memory_format)
_PATHS = ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")


DCP_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
DCP_FILESYSTEM_MODULE = "torch.distributed.checkpoint.filesystem"


def _plain_allowed() -> dict[tuple[str, str], object]:
    """(module, name) -> the object, for every global real DCP metadata may name outside DCP's own modules."""
    allowed: dict[tuple[str, str], object] = {("torch", "Size"): torch.Size}
    # dtypes, layouts and memory formats pickle as `torch.<name>`; layouts also through serialization's lookup
    allowed.update({("torch", n): v for n, v in vars(torch).items() if isinstance(v, _TORCH_VALUES)})
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    for module in {"pathlib", pathlib.PosixPath.__module__}:  # pathlib._local on Python 3.13+
        allowed.update({(module, n): getattr(pathlib, n) for n in _PATHS})
    allowed[("collections", "OrderedDict")] = OrderedDict
    allowed.update({("builtins", t.__name__): t for t in (set, frozenset, complex)})
    return allowed


PLAIN_GLOBALS = _plain_allowed()


@functools.cache
def allowed_globals() -> dict[tuple[str, str], object]:
    """(module, name) -> the object, for every global real DCP metadata may name: DCP's own classes (imported
    here, on first use: finalize's light loader never needs them) and PLAIN_GLOBALS."""
    from torch.distributed.checkpoint import filesystem, metadata

    allowed: dict[tuple[str, str], object] = {(DCP_METADATA_MODULE, n): getattr(metadata, n) for n in _DCP_CLASSES}
    allowed[(DCP_FILESYSTEM_MODULE, "_StorageInfo")] = filesystem._StorageInfo
    allowed.update(PLAIN_GLOBALS)
    return allowed


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a global that DCP metadata never holds."""

    def __init__(self, module: str, name: str) -> None:
        self.qualified = f"{module}.{name}"
        super().__init__(self.qualified)


class MetadataUnpickler(pickle.Unpickler):
    """An unpickler that resolves only allowed_globals(); persistent ids are refused by pickle itself."""

    def find_class(self, module: str, name: str) -> object:
        try:
            return allowed_globals()[(module, name)]
        except KeyError:
            raise RefusedGlobal(module, name) from None


class LightUnpickler(pickle.Unpickler):
    """An unpickler that builds light stand-ins (attribute holders and dicts, `torch.Size` as a tuple) for DCP's
    classes, by name, without importing DCP: the same globals as MetadataUnpickler are allowed and everything else
    refused. The result is only read by `dcp_table.model_table`, which checks every field it takes."""

    def find_class(self, module: str, name: str) -> object:
        found = LIGHT_GLOBALS.get((module, name)) or PLAIN_GLOBALS.get((module, name))
        if found is None:
            raise RefusedGlobal(module, name)
        return found


class Light:
    """An attribute holder: what NEWOBJ + BUILD make of a DCP dataclass under LightUnpickler."""


class LightRecord(dict):
    """What NEWOBJ + BUILD make of the dataclasses DCP pickles once per chunk (the chunk, its storage key and its
    storage entry) under LightUnpickler: a dict of the pickled fields, filled by `dict.update` (no Python code runs
    per object), hashed and compared by identity (so a storage index loads as a dict without running a dataclass
    __hash__ per chunk)."""

    __slots__ = ()
    __setstate__ = dict.update
    __hash__ = object.__hash__
    __eq__ = object.__eq__
    __ne__ = object.__ne__


class LightMetadata(Light):
    """Stands in for Metadata."""


class LightTensor(Light):
    """Stands in for TensorStorageMetadata."""


class LightChunk(LightRecord):
    """Stands in for ChunkStorageMetadata: {"offsets": ..., "sizes": ...}."""

    __slots__ = ()


class LightIndex(LightRecord):
    """Stands in for MetadataIndex: {"fqn": ..., "offset": ..., "index": ...}."""

    __slots__ = ()


class LightStorage(LightRecord):
    """Stands in for filesystem._StorageInfo: {"relative_path": ..., "offset": ..., "length": ...} (and
    "transform_descriptors" when set)."""

    __slots__ = ()


class LightBytes(Light):
    """Stands in for BytesStorageMetadata."""


class LightProperties(Light):
    """Stands in for TensorProperties, which pickles its fields as a tuple (dtype first)."""

    def __setstate__(self, state: object) -> None:
        if isinstance(state, tuple) and state:
            self.dtype = state[0]
        elif isinstance(state, dict):
            self.__dict__.update(state)


def _enum_value(value: object) -> object:
    """Stands in for DCP's _MEM_FORMAT_ENCODING enum (pickled as a call with its value)."""
    return value


LIGHT_GLOBALS: dict[tuple[str, str], object] = {
    (DCP_METADATA_MODULE, "Metadata"): LightMetadata,
    (DCP_METADATA_MODULE, "TensorStorageMetadata"): LightTensor,
    (DCP_METADATA_MODULE, "ChunkStorageMetadata"): LightChunk,
    (DCP_METADATA_MODULE, "MetadataIndex"): LightIndex,
    (DCP_METADATA_MODULE, "BytesStorageMetadata"): LightBytes,
    (DCP_METADATA_MODULE, "TensorProperties"): LightProperties,
    (DCP_METADATA_MODULE, "StorageMeta"): Light,
    (DCP_METADATA_MODULE, "_MEM_FORMAT_ENCODING"): _enum_value,
    (DCP_FILESYSTEM_MODULE, "_StorageInfo"): LightStorage,
    ("torch", "Size"): tuple,
}


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """The cyclic garbage collector paused: unpickling millions of chunk objects otherwise spends most of its time
    in collections that free nothing (the objects are all alive)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def load_metadata(folder: Path) -> Metadata:
    """`folder/.metadata`, safely unpickled and checked: every failure is one SourceError naming the file.

    The loader of DCP metadata as DCP's own objects (inspect, verify --source, --keep-optimizer); finalize's source
    reads it through `load_light` (dcp_table.py). Runs on: each rank that reads it.
    """
    from torch.distributed.checkpoint import metadata

    path = folder / METADATA_FILE
    loaded = unpickle(path, MetadataUnpickler)
    if not isinstance(loaded, metadata.Metadata) or not all(
        isinstance(getattr(loaded, field, None), dict) for field in ("state_dict_metadata", "storage_data")
    ):
        raise not_metadata(path)
    if not storage_regular(loaded.storage_data):
        for index, info in loaded.storage_data.items():
            check_storage_entry(index, info, path)
    return loaded


def storage_regular(storage: dict) -> bool:
    """Whether every entry of a storage index passes `check_storage_entry`, checked a whole list at a time (the
    per-entry check then names the first one that does not)."""
    globals_ = allowed_globals()
    index_type = globals_[(DCP_METADATA_MODULE, "MetadataIndex")]
    info_type = globals_[(DCP_FILESYSTEM_MODULE, "_StorageInfo")]
    infos = list(storage.values())
    if set(map(type, storage)) - {index_type} or set(map(type, infos)) - {info_type}:
        return False
    try:
        names, starts, lengths = (list(map(attrgetter(f), infos)) for f in ("relative_path", "offset", "length"))
    except AttributeError:
        return False
    if not infos:
        return True
    if set(map(type, names)) != {str} or {*map(type, starts), *map(type, lengths)} != {int}:
        return False
    return min(starts) >= 0 and min(lengths) >= 0 and all(map(DATA_FILE.fullmatch, set(names)))


def load_light(folder: Path) -> LightMetadata:
    """`folder/.metadata` unpickled by LightUnpickler (the same globals refused), unchecked beyond its top level:
    the caller checks what it takes (dcp_table.model_table). Runs on: the rank that reads the metadata."""
    path = folder / METADATA_FILE
    loaded = unpickle(path, LightUnpickler)
    if not isinstance(loaded, LightMetadata) or not all(
        isinstance(getattr(loaded, field, None), dict) for field in ("state_dict_metadata", "storage_data")
    ):
        raise not_metadata(path)
    return loaded


def unpickle(path: Path, unpickler: type[pickle.Unpickler]) -> Any:
    """The pickle at `path` loaded by `unpickler`, every failure one SourceError naming the file."""
    try:
        with open(path, "rb") as file, no_gc():
            return unpickler(file).load()
    except RefusedGlobal as exc:
        raise SourceError(
            f"refusing to load DCP metadata: it names {exc.qualified!r}, which a DCP checkpoint never holds",
            where=path,
            hint="the file was not written by torch.distributed.checkpoint and may run code when unpickled; "
            "do not load it with pickle or DCP, and pick a checkpoint from a source you trust",
        ) from None
    except OSError as exc:
        raise SourceError("cannot read DCP metadata", where=path, hint=exc.strerror or str(exc)) from exc
    except Exception as exc:  # a corrupt pickle can raise almost anything
        raise SourceError(
            "DCP metadata is truncated or not a DCP metadata pickle",
            where=path,
            hint=f"the checkpoint may be incomplete; pick another one with --checkpoint ({type(exc).__name__})",
        ) from exc


def not_metadata(path: Path) -> SourceError:
    return SourceError(
        "not a DCP metadata file, or a corrupt one", where=path, hint="pick another checkpoint with --checkpoint"
    )


def check_storage_entry(index: object, info: object, path: Path) -> None:
    """One entry of the storage index: a chunk key, and a bare DCP data file name with a byte range."""
    where = f"{path} (entry {getattr(index, 'fqn', index)!r})"
    globals_ = allowed_globals()
    index_type, info_type = (
        globals_[(DCP_METADATA_MODULE, "MetadataIndex")],
        globals_[(DCP_FILESYSTEM_MODULE, "_StorageInfo")],
    )
    if not isinstance(index, index_type) or not isinstance(info, info_type):
        raise SourceError(
            "DCP metadata has a malformed storage entry",
            where=where,
            hint="the file is corrupt; pick another checkpoint with --checkpoint",
        )
    check_data_file_name(getattr(info, "relative_path", None), path)
    for field in ("offset", "length"):
        value = getattr(info, field, None)
        if type(value) is not int or value < 0:
            raise SourceError(
                f"DCP metadata gives a chunk the {field} {value!r}",
                where=where,
                hint="the file is corrupt; pick another checkpoint with --checkpoint",
            )


def check_data_file_name(name: object, where: object) -> str:
    """`name` if it is a data file name DCP's FileSystemWriter writes (`__<rank>_<n>.distcp`), else SourceError."""
    if not isinstance(name, str) or not DATA_FILE.fullmatch(name):
        raise SourceError(
            f"DCP metadata names the data file {name!r}, not a file name torch.distributed.checkpoint writes "
            "(__<rank>_<n>.distcp, inside the checkpoint folder)",
            where=where,
            hint="refusing to read or write outside the checkpoint; the metadata is corrupt or was crafted, "
            "pick a checkpoint from a source you trust",
        )
    return name


def data_file(folder: Path, name: object) -> Path:
    """The checkpoint data file `name` of `folder`, checked to be a DCP file name that stays inside it once
    symlinks are resolved. Runs on: each rank, before it opens a checkpoint file."""
    path = folder / check_data_file_name(name, folder / METADATA_FILE)
    if os.path.dirname(os.path.realpath(path)) != os.path.realpath(folder):
        raise SourceError(
            f"the checkpoint data file {name} leads outside the checkpoint folder",
            where=path,
            hint=f"it is a symlink to {os.path.realpath(path)}; copy the file into the checkpoint folder",
        )
    return path


def kept_file_name(name: object, where: object) -> str:
    """The name of a checkpoint data file's copy in DEST: made here from the (checked) rank and file numbers."""
    match = DATA_FILE.fullmatch(check_data_file_name(name, where))
    return f"__{int(match.group(1))}_{int(match.group(2))}.distcp"
