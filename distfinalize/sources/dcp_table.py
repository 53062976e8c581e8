"""A DCP checkpoint's model chunk table: built once from `.metadata` (by the rank that reads it), shared trimmed.

`.metadata` holds, for every tensor, its chunk list (offsets and sizes in the tensor) and, in a storage index,
each chunk's data file and byte range; optimizer and trainer entries sit beside the model's. `model_table` turns
the light objects `dcp_metadata.load_light` unpickles into:

- `DcpShared`: what every rank needs to plan (model tensors' names, shapes and dtypes, the count of skipped
  entries, the data files and their writer ranks), small enough to broadcast;
- the chunk table, storage key -> `StoredChunk`s, which a rank needs only for the tensors it reads: rank 0 keeps
  the whole model's, the others get their own part (`trim`, `in_files`).

Every field taken is checked here (the file is untrusted): chunk lists are lists of chunks whose offsets and
sizes are tuples of non-negative ints, one per dimension, inside the tensor; each chunk has exactly one storage
entry, a bare DCP data file name with a non-negative byte range. Optimizer entries are counted, never kept.
Pure (no I/O).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from itertools import chain, compress, repeat
from operator import add, itemgetter
from pathlib import Path
from typing import NamedTuple

import torch

from distfinalize.errors import SourceError
from distfinalize.sources import TensorMeta
from distfinalize.sources.dcp_metadata import (
    DATA_FILE,
    METADATA_FILE,
    LightChunk,
    LightIndex,
    LightMetadata,
    LightProperties,
    LightStorage,
    LightTensor,
    check_data_file_name,
    load_light,
    no_gc,
)

RANK_FILE = re.compile(r"__(\d+)_\d+\.distcp$")


class StoredChunk(NamedTuple):
    """One stored chunk of a tensor: its place in the tensor's chunk list and in the tensor, and its bytes in
    a data file. (A NamedTuple: rank 0 makes millions of them for the largest checkpoints.)"""

    index: int  # its place in the tensor's chunk list
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str  # the data file (a checked bare `__<rank>_<n>.distcp` name)
    offset: int  # byte range of its torch.save record in the file
    length: int
    transforms: tuple[str, ...] = ()  # DCP transform descriptors (distfinalize refuses to read such a chunk)


ChunkTable = dict[str, tuple[StoredChunk, ...]]


@dataclass(frozen=True)
class DcpShared:
    """What every rank knows of a DCP checkpoint before reading a byte: broadcast once from the rank that read
    `.metadata`."""

    tensors: tuple[TensorMeta, ...]
    skipped: int  # entries that are not model tensors (optimizer and trainer state): counted, not kept
    files: Mapping[str, int | None]  # every data file holding model chunks -> the training rank that wrote it

    @property
    def saved_world_size(self) -> int | None:
        writers = [w for w in self.files.values() if w is not None]
        return max(writers) + 1 if writers else None


def corrupt(path: Path, what: str) -> SourceError:
    return SourceError(
        f"DCP metadata is malformed: {what}",
        where=path / METADATA_FILE,
        hint="the file is corrupt; pick another checkpoint with --checkpoint",
    )


def read_table(path: Path, name_of) -> tuple[DcpShared, ChunkTable]:
    """`model_table` of `path/.metadata`, with the cyclic collector paused until the loaded objects are freed (so
    it never walks them). Runs on: the rank that reads `.metadata`."""
    with no_gc():
        return model_table(load_light(path), path, name_of)


def model_table(loaded: LightMetadata, path: Path, name_of) -> tuple[DcpShared, ChunkTable]:
    """The shared description and the chunk table of the model tensors of `loaded`; `name_of(key, path)` gives a
    tensor's model name, or None for an entry that is not part of the model. Pure; raises SourceError for
    anything malformed.

    Checked in bulk first (`bulk_table`: whole lists at a time, at C speed); anything the bulk check does not
    vouch for sends the whole table through the per-chunk check (`checked_table`), which accepts exactly what the
    bulk check accepts, builds the same table, and names the first malformed entry."""
    paths = getattr(loaded, "planner_data", None)
    paths = paths if isinstance(paths, dict) else {}
    with no_gc():
        tensors, skipped = [], 0
        for key, md in loaded.state_dict_metadata.items():
            name = name_of(key, paths.get(key)) if isinstance(key, str) else None
            if name is None or not isinstance(md, LightTensor):
                skipped += 1
                continue
            shape, dtype = tensor_header(md, key, path)
            tensors.append(TensorMeta(key, name, shape, dtype))
        try:
            table, files = bulk_table(loaded, tensors)
        except Irregular:
            table, files = checked_table(loaded, tensors, path)
    return DcpShared(tuple(tensors), skipped, files), table


def checked_table(
    loaded: LightMetadata, tensors: list[TensorMeta], path: Path
) -> tuple[ChunkTable, dict[str, int | None]]:
    """The chunk table and data files of `tensors`, checked chunk by chunk (raises SourceError naming the first
    malformed entry)."""
    places = storage_places(loaded.storage_data, {t.key: t for t in tensors}, path)
    table: ChunkTable = {}
    files: dict[str, int | None] = {}
    for t in tensors:
        chunks = getattr(loaded.state_dict_metadata[t.key], "chunks", None)
        if not isinstance(chunks, list):
            raise corrupt(path, f"{t.key!r} has no chunk list")
        table[t.key] = tuple(stored(t, i, c, places, files, path) for i, c in enumerate(chunks))
    if places:
        key, offsets = next(iter(places))
        raise corrupt(path, f"the storage index has an entry for {key!r} at {list(offsets)} that no chunk lists")
    return table, files


class Irregular(Exception):
    """Something the bulk check does not vouch for: the per-chunk check decides, and names it if it is an error."""


_FQN, _OFFSET, _OFFSETS, _SIZES = (itemgetter(f) for f in ("fqn", "offset", "offsets", "sizes"))
_FILE, _LENGTH = itemgetter("relative_path"), itemgetter("length")
_NEW_CHUNK = partial(tuple.__new__, StoredChunk)  # StoredChunk from a tuple of its fields, without Python code


def bulk_table(loaded: LightMetadata, tensors: list[TensorMeta]) -> tuple[ChunkTable, dict[str, int | None]]:
    """`checked_table`'s result, checked a whole list at a time: raises Irregular wherever a field is not exactly
    what DCP writes (a type, a count, a bound, a missing, spare or repeated entry, a transform), so the per-chunk
    check runs and decides.

    The storage index is read field by field in its own order (rank by rank, as DCP writes it: each entry's
    objects lie together in memory), checked, and grouped by tensor (a stable sort on small ints); each group's
    offsets are compared with the tensor's chunk list, which DCP lists in the same rank order (a group in another
    order is joined by offsets)."""
    storage = loaded.storage_data
    if type(storage) is not dict:
        raise Irregular
    keys, infos = list(storage), list(storage.values())
    if set(map(type, keys)) - {LightIndex} or set(map(type, infos)) - {LightStorage}:
        raise Irregular
    lists = [getattr(loaded.state_dict_metadata[t.key], "chunks", None) for t in tensors]
    if set(map(type, lists)) - {list}:
        raise Irregular
    position = {t.key: i for i, t in enumerate(tensors)}
    try:
        owner = list(map(position.get, map(_FQN, keys), repeat(-1)))  # -1: not a model tensor's entry
        if -1 in owner:  # optimizer and trainer entries: not looked at further
            model = list(compress(range(len(keys)), map((-1).__ne__, owner)))
            keys, infos, owner = (list(map(column.__getitem__, model)) for column in (keys, infos, owner))
        columns = [list(map(_OFFSET, keys)), *(list(map(field, infos)) for field in (_FILE, _OFFSET, _LENGTH))]
    except (KeyError, TypeError):  # an entry without a field, or an unhashable one
        raise Irregular from None
    if infos and not regular_entries(*columns[1:], infos):
        raise Irregular
    order = sorted(range(len(keys)), key=owner.__getitem__)
    lengths = list(map(len, lists))
    if list(map(owner.__getitem__, order)) != list(chain.from_iterable(map(repeat, range(len(tensors)), lengths))):
        raise Irregular  # a tensor with more or fewer storage entries than chunks
    stored, names, starts, sizes = (list(map(column.__getitem__, order)) for column in columns)
    files = data_files(names)
    table: ChunkTable = {}
    at = 0
    for t, chunks, n in zip(tensors, lists, lengths, strict=True):
        places = slice(at, at + n)
        table[t.key] = bulk_chunks(t, chunks, stored[places], names[places], starts[places], sizes[places])
        at += n
    return table, files


def regular_entries(names: list, starts: list, lengths: list, infos: list[LightStorage]) -> bool:
    """Whether storage entries (as columns) name files by str with int byte ranges, none negative, no transform."""
    if set(map(type, names)) != {str} or {*map(type, starts), *map(type, lengths)} != {int}:
        return False
    return min(starts) >= 0 and min(lengths) >= 0 and not any(map(dict.get, infos, repeat("transform_descriptors")))


def data_files(names: list[str]) -> dict[str, int | None]:
    """Each data file named (in order of first use) -> its writer rank, every name a DCP data file name."""
    files: dict[str, int | None] = {}
    for name in dict.fromkeys(names):
        match = DATA_FILE.fullmatch(name)
        if match is None:
            raise Irregular
        files[name] = int(match.group(1))
    return files


def bulk_chunks(
    t: TensorMeta, chunks: list, stored: list, names: list[str], starts: list[int], lengths: list[int]
) -> tuple[StoredChunk, ...]:
    """`stored` for every chunk of `t`'s chunk list at once, given its storage entries as columns (as many as
    chunks): offsets, file names, byte ranges (their types already checked)."""
    if not chunks:
        return ()
    if set(map(type, chunks)) - {LightChunk}:
        raise Irregular
    try:
        offsets, sizes = list(map(_OFFSETS, chunks)), list(map(_SIZES, chunks))
    except KeyError:
        raise Irregular from None
    ndim = len(t.shape)
    if {*map(type, offsets), *map(type, sizes), *map(type, stored)} != {tuple}:
        raise Irregular
    if {*map(len, offsets), *map(len, sizes)} != {ndim}:
        raise Irregular
    if ndim:
        flat = [*chain.from_iterable(offsets), *chain.from_iterable(sizes)]
        if set(map(type, flat)) != {int} or min(flat) < 0:
            raise Irregular
        for d, extent in enumerate(t.shape):
            if max(map(add, map(itemgetter(d), offsets), map(itemgetter(d), sizes))) > extent:
                raise Irregular
    if stored != offsets:  # saved in another order: join by offsets
        try:
            place = dict(zip(stored, range(len(stored)), strict=True))
            if len(place) != len(stored):
                raise Irregular
            perm = list(map(place.pop, offsets))
        except (KeyError, TypeError):  # an offset with no entry, or an unhashable one
            raise Irregular from None
        names, starts, lengths = (list(map(column.__getitem__, perm)) for column in (names, starts, lengths))
    return tuple(map(_NEW_CHUNK, zip(range(len(chunks)), offsets, sizes, names, starts, lengths, repeat(()))))


def tensor_header(md: LightTensor, key: str, path: Path) -> tuple[tuple[int, ...], torch.dtype]:
    """A tensor entry's shape and dtype, checked."""
    size, props = getattr(md, "size", None), getattr(md, "properties", None)
    dtype = getattr(props, "dtype", None)
    if not isinstance(props, LightProperties) or not isinstance(dtype, torch.dtype):
        raise corrupt(path, f"{key!r} has no dtype")
    if type(size) is not tuple or not all(type(d) is int and d >= 0 for d in size):
        raise corrupt(path, f"{key!r} has the size {size!r}")
    return size, dtype


def storage_places(
    storage: object, wanted: Mapping[str, TensorMeta], path: Path
) -> dict[tuple[str, tuple[int, ...]], LightStorage]:
    """(key, offsets) -> storage entry, for the model tensors' entries (the others are not looked at further)."""
    if not isinstance(storage, dict):
        raise corrupt(path, "no storage index")
    places = {}
    for index, info in storage.items():
        if not isinstance(index, LightIndex) or type(fqn := index.get("fqn")) is not str or fqn not in wanted:
            continue
        offsets = index.get("offset")
        if not isinstance(info, LightStorage) or type(offsets) is not tuple:
            raise corrupt(path, f"a storage entry of {fqn!r}")
        if (fqn, offsets) in places:
            raise corrupt(path, f"two storage entries for {fqn!r} at {list(offsets)}")
        places[(fqn, offsets)] = info
    return places


def stored(
    t: TensorMeta,
    index: int,
    chunk: object,
    places: dict[tuple[str, tuple[int, ...]], LightStorage],
    files: dict[str, int | None],
    path: Path,
) -> StoredChunk:
    """One chunk of `t`, checked against its tensor and joined with its storage entry (taken out of `places`)."""
    offsets, sizes = (chunk.get("offsets"), chunk.get("sizes")) if isinstance(chunk, LightChunk) else (None, None)
    if type(offsets) is not tuple or type(sizes) is not tuple:
        raise corrupt(path, f"chunk {index} of {t.key!r} is not a chunk")
    if not (len(offsets) == len(sizes) == len(t.shape)) or not all(
        type(o) is int and type(s) is int and o >= 0 and s >= 0 and o + s <= d
        for o, s, d in zip(offsets, sizes, t.shape, strict=True)
    ):
        raise corrupt(path, f"chunk {index} of {t.key!r} at {offsets!r} of {sizes!r} lies outside {list(t.shape)}")
    info = places.pop((t.key, offsets), None)
    if info is None:
        raise corrupt(path, f"{t.key!r} lists a chunk at {list(offsets)} that has no storage entry")
    file, offset, length = info.get("relative_path"), info.get("offset"), info.get("length")
    if type(file) is not str or file not in files:
        check_data_file_name(file, path / METADATA_FILE)
        match = RANK_FILE.search(file)
        files[file] = int(match.group(1)) if match else None
    for field, value in (("offset", offset), ("length", length)):
        if type(value) is not int or value < 0:
            raise SourceError(
                f"DCP metadata gives a chunk the {field} {value!r}",
                where=f"{path / METADATA_FILE} (entry {t.key!r})",
                hint="the file is corrupt; pick another checkpoint with --checkpoint",
            )
    transforms = info.get("transform_descriptors") or ()
    return StoredChunk(index, offsets, sizes, file, offset, length, tuple(map(str, transforms)))


def trim(table: Mapping[str, tuple[StoredChunk, ...]], keys: Iterable[str]) -> ChunkTable:
    """The chunk lists of `keys` (those in the table). Pure."""
    return {key: table[key] for key in keys if key in table}


def in_files(table: Mapping[str, tuple[StoredChunk, ...]], files: Collection[str]) -> ChunkTable:
    """Each tensor's chunks stored in `files` (tensors with none left out). Pure."""
    out: ChunkTable = {}
    for key, chunks in table.items():
        mine = tuple(c for c in chunks if c.file in files)
        if mine:
            out[key] = mine
    return out


def by_reader(
    table: Mapping[str, tuple[StoredChunk, ...]], readers: Mapping[str, int], world_size: int
) -> list[ChunkTable]:
    """Per rank, the chunks stored in the files it reads (`readers`: file -> rank), in one pass. Pure."""
    out: list[dict[str, list[StoredChunk]]] = [{} for _ in range(world_size)]
    for key, chunks in table.items():
        for c in chunks:
            out[readers[c.file]].setdefault(key, []).append(c)
    return [{key: tuple(chunks) for key, chunks in part.items()} for part in out]
