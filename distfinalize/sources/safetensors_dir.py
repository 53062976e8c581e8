"""Safetensors weight files as a source: a Hugging Face model dir (model.safetensors, or shards and
model.safetensors.index.json, as save_pretrained and the Trainer write them) and what torch's
`HuggingFaceStorageWriter` (DCP with safetensors storage: torchtitan's `last_save_in_hf`, torchtune) writes.

What torch's writer leaves on disk (torch/distributed/checkpoint/hf_storage.py, _hf_utils.py):
- every file's `__metadata__` holds `DCP_SHARDING_INFO`, a JSON map of tensor name -> {"saved_offsets": [...]}:
  where the tensor stored in that file sits inside the whole tensor;
- `save_distributed=False`: `model-0000i-of-0000N.safetensors` and `model.safetensors.index.json` (a model dir);
- `save_distributed=True`: `shard-0000R-model-0000i-of-0000N.safetensors`, one set per saving rank R (from 1),
  each holding that rank's shard of its tensors, and no index;
- with `enable_consolidation=True` the shards go to `sharded/` and whole tensors plus the index beside it.

Only the headers are read to describe the files (strictly: safetensors_header.py); a reader reads each tensor, or
each shard of it, at the byte range its header gives, so a rank touches only the bytes of the tensors it writes.
Runs on: all ranks (headers), each rank for its own tensors (reads).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import _TYPES as SAFETENSORS_CODES

from distfinalize.errors import SourceError
from distfinalize.hfnames import INDEX_FILE, SINGLE_FILE
from distfinalize.sources import SourceFormat, SourceInfo, TensorMeta, copy_rows, overlapping, row_pieces
from distfinalize.sources.safetensors_header import HeaderError, read_header

DCP_SHARD_FILE = re.compile(r"^shard-(\d+)-model-\d+-of-\d+\.safetensors$")  # torch's SHARDED_FILE_NAME
DCP_SHARDING_KEY = "DCP_SHARDING_INFO"  # torch's CUSTOM_METADATA_KEY
SAVED_OFFSETS_KEY = "saved_offsets"


@dataclass(frozen=True)
class StoredPiece:
    """A tensor, or one shard of it, in a safetensors file: its bytes and its place in the whole tensor."""

    file: str
    start: int  # first byte in the file
    nbytes: int
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


def is_safetensors_dir(path: Path) -> bool:
    """A model dir with model.safetensors or its index, or a dir of DCP safetensors shards (names only)."""
    if (path / INDEX_FILE).is_file() or (path / SINGLE_FILE).is_file():
        return True
    try:
        return any(DCP_SHARD_FILE.match(p.name) for p in path.iterdir())
    except OSError:
        return False


def weight_files(path: Path) -> tuple[list[str], dict[str, str] | None]:
    """The weight files to read, and the index's tensor name -> file map when there is an index."""
    if (path / INDEX_FILE).is_file():
        return indexed_files(path, INDEX_FILE)
    if (path / SINGLE_FILE).is_file():
        return [SINGLE_FILE], None
    shards = sorted(p.name for p in path.iterdir() if DCP_SHARD_FILE.match(p.name))
    if shards:
        check_writers(path, shards)
        return shards, None
    raise SourceError(
        "no safetensors weights", where=path, hint=f"expected {SINGLE_FILE}, {INDEX_FILE} or DCP shard files"
    )


def check_writers(path: Path, shards: Sequence[str]) -> None:
    """Every saving rank up to the highest one named must have left files (shard-0000R-..., R from 1). A missing
    last rank leaves no trace in the names: its tensors then come out short, which config.json's shapes catch."""
    writers = {int(m.group(1)) for name in shards if (m := DCP_SHARD_FILE.match(name))}
    missing = sorted(set(range(1, max(writers) + 1)) - writers)
    if missing:
        shown = ", ".join(f"shard-{r:05d}-*.safetensors" for r in missing[:4])
        raise SourceError(
            f"the per-rank safetensors files of {len(missing)} saving rank(s) are missing ({shown})",
            where=path,
            hint="the checkpoint is incomplete; restore the missing files or finalize another checkpoint",
        )


def indexed_files(path: Path, index_name: str) -> tuple[list[str], dict[str, str]]:
    """The weight files an index in `path` names, each checked to be there, and its tensor name -> file map."""
    index = read_index(path / index_name)
    files = sorted(set(index.values()))
    missing = [f for f in files if not (path / f).is_file()]
    if missing:
        raise SourceError(
            f"{index_name} names a weight file that is not there ({missing[0]})",
            where=path,
            hint="the model dir is incomplete; copy the missing file or save the model again",
        )
    return files, index


def read_index(path: Path) -> dict[str, str]:
    """An index's weight_map: tensor name -> a file beside the index."""
    try:
        weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise TypeError("weight_map must map tensor names to file names")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        hint = f"{type(exc).__name__}: {exc}; restore the file or save the model again"
        raise SourceError("cannot read the safetensors index", where=path, hint=hint) from exc
    for file in set(weight_map.values()):
        if "/" in file or "\\" in file or file in ("", ".", ".."):
            raise SourceError(
                f"the safetensors index names a file outside its dir ({file!r})", where=path, hint="fix the index"
            )
    return dict(weight_map)


def file_pieces(path: Path, file: str) -> dict[str, tuple[torch.dtype, StoredPiece]]:
    """The tensors of one file by name: dtype and where they lie, from its header alone."""
    try:
        header = read_header(path / file, check_library=False)
        sharding = json.loads(header.metadata[DCP_SHARDING_KEY]) if DCP_SHARDING_KEY in header.metadata else {}
        if not isinstance(sharding, dict):
            raise HeaderError(f"{DCP_SHARDING_KEY} is not a JSON object")
    except (HeaderError, ValueError) as exc:
        raise SourceError(
            "a safetensors file is corrupt or truncated",
            where=path / file,
            hint=f"{exc}; restore it, or finalize another checkpoint with --checkpoint",
        ) from exc
    out = {}
    for name, entry in header.tensors.items():
        if entry.dtype not in SAFETENSORS_CODES:
            what = f"tensor {name!r} has dtype {entry.dtype}, which torch has no type for"
            raise SourceError(what, where=path / file)
        offsets = _saved_offsets(sharding.get(name), len(entry.shape), name, path / file)
        out[name] = (SAFETENSORS_CODES[entry.dtype], StoredPiece(file, entry.start, entry.nbytes, offsets, entry.shape))
    return out


def _saved_offsets(info: object, ndim: int, name: str, where: Path) -> tuple[int, ...]:
    if info is None:
        return (0,) * ndim
    offsets = info.get(SAVED_OFFSETS_KEY) if isinstance(info, dict) else None
    if not isinstance(offsets, list) or len(offsets) != ndim or not all(isinstance(o, int) and o >= 0 for o in offsets):
        raise SourceError(
            f"{DCP_SHARDING_KEY} gives {name!r} malformed saved_offsets ({offsets!r})",
            where=where,
            hint="the file is corrupt; restore it",
        )
    return tuple(offsets)


class SafetensorsSource:
    """Safetensors weight files, described from their headers. Runs on: all ranks."""

    def __init__(self, path: Path, step: int | None = None) -> None:
        self.path = path
        files, index = weight_files(path)
        pieces: dict[str, list[StoredPiece]] = {}
        dtypes: dict[str, torch.dtype] = {}
        for file in files:
            for name, (dtype, piece) in file_pieces(path, file).items():
                if index is not None and name not in index:
                    continue  # a tensor the index leaves out is not part of the model transformers loads
                if index is not None and index[name] != file:
                    continue  # the index says which file holds it
                if dtypes.setdefault(name, dtype) != dtype:
                    raise SourceError(f"the shards of {name!r} differ in dtype", where=path / file)
                pieces.setdefault(name, []).append(piece)
        if index is not None:
            absent = [name for name in index if name not in pieces]
            if absent:
                raise SourceError(
                    f"{INDEX_FILE} places {absent[0]!r} in {index[absent[0]]}, which does not hold it",
                    where=path,
                    hint="the index does not match its files; save the model again",
                )
        self.pieces = {name: tuple(sorted(ps, key=lambda p: p.offsets)) for name, ps in pieces.items()}
        self.tensors = tuple(
            TensorMeta(name, name, whole_shape(name, ps, path), dtypes[name]) for name, ps in self.pieces.items()
        )
        if not self.tensors:
            raise SourceError("the safetensors files hold no tensors", where=path, hint="point SRC at a saved model")
        writers = {int(m.group(1)) for f in files if (m := DCP_SHARD_FILE.match(f))}
        self.info = SourceInfo("safetensors", path, step, len(writers) or None)

    def reader(self) -> SafetensorsReader:
        return SafetensorsReader(self.path, self.pieces, {t.key: t for t in self.tensors})


def whole_shape(name: str, pieces: Sequence[StoredPiece], where: Path) -> tuple[int, ...]:
    """The shape of the whole tensor its pieces make, refusing pieces that do not cover it once. Pure."""
    if len(pieces) == 1 and not any(pieces[0].offsets):
        return pieces[0].sizes
    shape = tuple(max(p.offsets[d] + p.sizes[d] for p in pieces) for d in range(len(pieces[0].sizes)))
    if sum(torch.Size(p.sizes).numel() for p in pieces) != torch.Size(shape).numel():
        files = ", ".join(sorted({p.file for p in pieces})[:4])
        raise SourceError(
            f"the stored pieces of {name!r} do not make up the whole tensor (overlapping or missing shards)",
            where=f"{where} ({files})",
            hint="a shard file is missing or comes from another save; finalize a complete checkpoint",
        )
    return shape


class SafetensorsReader:
    """Reads whole tensors at the byte ranges the headers give, each file opened once per call.
    Runs on: each rank, for its own tensors."""

    def __init__(self, path: Path, pieces: dict[str, tuple[StoredPiece, ...]], meta: dict[str, TensorMeta]) -> None:
        self.path = path
        self.pieces = pieces
        self.meta = meta

    def read(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """Fetch `keys` (stored dtype, CPU): a tensor stored whole is the buffer read; shards are copied into
        place one at a time."""
        todo = sorted(((p.file, p.start, key, p) for key in keys for p in self.pieces[key]), key=lambda x: x[:2])
        out: dict[str, torch.Tensor] = {}
        file, opened = None, None
        try:
            for name, _, key, piece in todo:
                if name != opened:
                    if file is not None:
                        file.close()
                    file, opened = open(self.path / name, "rb", buffering=0), name  # noqa: SIM115
                meta = self.meta[key]
                data = read_bytes(file, piece, self.path / name).view(meta.dtype).view(piece.sizes)
                if piece.sizes == meta.shape:
                    out[key] = data
                    continue
                target = out.setdefault(key, torch.empty(meta.shape, dtype=meta.dtype))
                for dim, (offset, size) in enumerate(zip(piece.offsets, piece.sizes, strict=True)):
                    target = target.narrow(dim, offset, size)
                target.copy_(data)
        except OSError as exc:
            raise SourceError(
                "cannot read a safetensors file",
                where=exc.filename or self.path,
                hint=f"{exc.strerror or exc}; check the file and its permissions",
            ) from exc
        finally:
            if file is not None:
                file.close()
        return out

    def row_cuts(self, key: str) -> list[int] | None:
        """None for a tensor stored whole (any rows are read exactly), else the rows where its pieces start."""
        return row_pieces([(p.offsets, p.sizes) for p in self.pieces[key]])

    def read_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of `key` (stored dtype, CPU): of a whole tensor just their bytes; of a sharded one
        the pieces that hold them."""
        meta, pieces = self.meta[key], self.pieces[key]
        if not meta.shape:
            return self.read([key])[key]
        out = torch.empty((stop - start, *meta.shape[1:]), dtype=meta.dtype)
        try:
            for piece in pieces:
                if not overlapping(piece.offsets, piece.sizes, start, stop):
                    continue
                where = self.path / piece.file
                with open(where, "rb", buffering=0) as file:
                    if len(pieces) == 1:  # rows of a whole tensor are contiguous: read just them
                        row = piece.nbytes // max(1, meta.shape[0])
                        part = replace(piece, start=piece.start + start * row, nbytes=(stop - start) * row)
                        return read_bytes(file, part, where).view(meta.dtype).view(out.shape)
                    data = read_bytes(file, piece, where).view(meta.dtype).view(piece.sizes)
                copy_rows(out, start, piece.offsets, data)
        except OSError as exc:
            raise SourceError(
                "cannot read a safetensors file",
                where=exc.filename or self.path,
                hint=f"{exc.strerror or exc}; check the file and its permissions",
            ) from exc
        return out


def read_bytes(file, piece: StoredPiece, where: Path) -> torch.Tensor:
    """The piece's bytes, as a fresh uint8 tensor; a file that ends early is an error naming it."""
    buffer = torch.empty(piece.nbytes, dtype=torch.uint8)
    view = memoryview(buffer.numpy())
    file.seek(piece.start)
    got = 0
    while got < piece.nbytes:
        n = file.readinto(view[got:])
        if not n:
            raise SourceError(
                "a safetensors file is truncated",
                where=where,
                hint=f"it ends {piece.nbytes - got} byte(s) short of a tensor its header lists; restore it",
            )
        got += n
    return buffer


SAFETENSORS_FORMAT = SourceFormat(
    "safetensors",
    "Hugging Face model dir or DCP safetensors (safetensors)",
    is_safetensors_dir,
    SafetensorsSource,
    fallback=True,
)
