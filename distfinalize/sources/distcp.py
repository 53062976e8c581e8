"""The tensor chunks of `.distcp` files: each a torch.save zip at a byte range `.metadata` records.

A chunk is read once, into a fresh buffer, and checked where it lies: every zip record against its CRC-32,
the tensor's header (dtype, shape, strides: torch.load parses it, with no data) against `.metadata`. The
storage record is then a view of that buffer, not a copy. DCP's `FileSystemReader.read_data` loads the same
records with `torch.load`, which copies each storage out of the bytes it read (and then into the target)
and checks nothing, so a flipped byte or a chunk of the wrong dtype would load silently. Runs on: each rank,
for the chunks it reads.
"""

from __future__ import annotations

import io
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass
from typing import BinaryIO

import torch

ZIP_MAGIC = b"PK\x03\x04"
STORAGE_RECORD = re.compile(r"/data/\d+$")  # torch.save names storages <archive>/data/<key>
LOCAL_HEADER_SIZE = 30  # zip spec: the fixed part of a local file header; name and extra lengths at 26 and 28
TAIL_BYTES = 4096  # a record's last bytes read for its zip directory (torch.save's five entries take about 600)


class ChunkError(ValueError):
    """A checkpoint chunk is truncated, fails its checksum, or is not the tensor `.metadata` describes."""


@dataclass(frozen=True)
class ZipRecord:
    """One stored (uncompressed) record of a torch.save zip: where its bytes lie in the chunk."""

    name: str
    start: int
    size: int
    crc: int

    @property
    def end(self) -> int:
        return self.start + self.size


class BufferFile(io.RawIOBase):
    """A read-only, seekable file over bytes already in memory (no copy), for zipfile and torch.load."""

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self.view = view
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: len(self.view)}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]  # io's own signature
        data = self.view[self.pos : self.pos + len(buffer)]
        memoryview(buffer).cast("B")[: len(data)] = data
        self.pos += len(data)
        return len(data)


class TailFile(BufferFile):
    """The last bytes of a record `length` bytes long, read as if the whole record were there (zipfile lists an
    archive from its end); reading before them raises OSError."""

    def __init__(self, tail: memoryview, length: int) -> None:
        super().__init__(tail)
        self.base, self.length = length - len(tail), length

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]  # io's own signature
        if self.pos < self.base:
            raise OSError("the zip directory starts before the bytes read")
        data = self.view[self.pos - self.base : self.pos - self.base + len(buffer)]
        memoryview(buffer).cast("B")[: len(data)] = data
        self.pos += len(data)
        return len(data)


def stored_crc(tail: memoryview, length: int, nbytes: int) -> int | None:
    """The CRC-32 a torch.save record `length` bytes long stores for its one storage, from the record's last bytes
    (`tail`), when that storage holds exactly `nbytes`; None when the tail does not tell. Not verified: two chunks
    whose CRCs differ hold different bytes, but equal CRCs prove nothing. Pure."""
    try:
        with zipfile.ZipFile(TailFile(tail, length)) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, EOFError, ValueError, OSError):
        return None
    storages = [i for i in infos if STORAGE_RECORD.search(i.filename)]
    if len(storages) != 1 or storages[0].file_size != nbytes or storages[0].compress_type != zipfile.ZIP_STORED:
        return None
    return storages[0].CRC


def read_chunk(file: BinaryIO, offset: int, length: int, where: str) -> torch.Tensor:
    """The `length` bytes at `offset` of an open `.distcp` file, as a fresh uint8 tensor."""
    buffer = torch.empty(length, dtype=torch.uint8)
    view = memoryview(buffer.numpy())
    file.seek(offset)
    got = 0
    while got < length:
        n = file.readinto(view[got:])
        if not n:
            raise ChunkError(f"{where}: the file ends after {got} of {length} bytes (truncated)")
        got += n
    return buffer


def load_chunk(buffer: torch.Tensor, where: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """The tensor a verified chunk record holds, as a view of `buffer` (uint8, the whole record)."""
    view = memoryview(buffer.numpy())
    if bytes(view[:4]) != ZIP_MAGIC:
        raise ChunkError(f"{where}: not a torch.save record")
    records = zip_records(view, where)
    for record in records:
        if zlib.crc32(view[record.start : record.end]) != record.crc:
            raise ChunkError(f"{where}: checksum mismatch in record {record.name!r} (the file is corrupt)")
    try:
        header = torch.load(BufferFile(view), map_location="meta", weights_only=True)  # no data is read
    except Exception as exc:  # any failure to load a record that passed its CRCs is corruption of its contents
        raise ChunkError(f"{where}: the record does not load ({type(exc).__name__})") from exc
    if not isinstance(header, torch.Tensor) or header.dtype != dtype or tuple(header.shape) != shape:
        found = f"{header.dtype} {list(header.shape)}" if isinstance(header, torch.Tensor) else type(header).__name__
        raise ChunkError(f"{where}: holds {found} where .metadata says {dtype} {list(shape)}")
    storages = [r for r in records if STORAGE_RECORD.search(r.name)]
    nbytes = header.numel() * dtype.itemsize
    if (
        len(storages) == 1
        and storages[0].size == nbytes
        and header.is_contiguous()
        and header.storage_offset() == 0
        and storages[0].start % dtype.itemsize == 0
    ):
        start = storages[0].start
        return buffer[start : start + nbytes].view(dtype).view(shape)
    return torch.load(BufferFile(view), map_location="cpu", weights_only=True)  # an unusual layout: a copy


def zip_records(view: memoryview, where: str) -> list[ZipRecord]:
    """The records of a torch.save zip (central directory, then each local header), bounds-checked."""
    try:
        with zipfile.ZipFile(BufferFile(view)) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, EOFError, ValueError, OSError) as exc:
        raise ChunkError(f"{where}: not a readable torch.save record ({exc})") from exc
    records = []
    for info in infos:
        head = bytes(view[info.header_offset : info.header_offset + LOCAL_HEADER_SIZE])
        if len(head) != LOCAL_HEADER_SIZE or not head.startswith(ZIP_MAGIC):
            raise ChunkError(f"{where}: record {info.filename!r} has no local header (the file is corrupt)")
        name_length, extra_length = struct.unpack_from("<HH", head, 26)
        start = info.header_offset + LOCAL_HEADER_SIZE + name_length + extra_length
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise ChunkError(f"{where}: record {info.filename!r} is compressed, which torch.save never does")
        if start + info.file_size > len(view):
            raise ChunkError(f"{where}: record {info.filename!r} runs past the chunk (the file is corrupt)")
        records.append(ZipRecord(info.filename, start, info.file_size, info.CRC))
    return records
