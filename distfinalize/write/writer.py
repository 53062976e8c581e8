"""Write one safetensors file, streaming: the header is known from the plan, tensors go to their offsets.

The safetensors library serializes a whole file from memory at once; writing tensor by tensor at
precomputed offsets keeps a rank's memory to the tensors in flight instead of the whole file.
The layout is the library's own: 8-byte little-endian header length, JSON header padded with spaces
to a multiple of 8, data sorted by alignment then name. Runs on: the rank that owns the file.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import mmap
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from distfinalize.hfnames import SAFETENSORS_DTYPES

# The library orders a file's tensors by dtype (descending, in the order of its Dtype enum), then by name.
# Following it makes our files byte-identical to `safetensors.torch.save_file`'s (checked in the unit tests).
SAFETENSORS_ORDER = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "F16", "BF16", "I32", "F32", "F64", "I64")
HEADER_ALIGNMENT = 8
DEFAULT_METADATA = {"format": "pt"}


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor's bytes go in the file (offsets from the start of the file)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class FileLayout:
    """A safetensors file's serialized header and the slot of every tensor."""

    header: bytes
    slots: Mapping[str, TensorSlot]
    size: int


def layout(
    tensors: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
    metadata: Mapping[str, str] | None = None,
    as_given: bool = False,
) -> FileLayout:
    """Compute the file layout from (name, shape, dtype) alone: in the library's order, or in the order given
    (`as_given`). Pure."""
    for name, _, dtype in tensors:
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {dtype}, which safetensors cannot store")
    ordered = (
        list(tensors)
        if as_given
        else sorted(tensors, key=lambda t: (-SAFETENSORS_ORDER.index(SAFETENSORS_DTYPES[t[2]]), t[0]))
    )
    entries: dict[str, object] = {"__metadata__": dict(metadata or DEFAULT_METADATA)}
    spans = []
    offset = 0
    for name, shape, dtype in ordered:
        size = torch.Size(shape).numel() * dtype.itemsize
        entries[name] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        spans.append((name, dtype, tuple(shape), offset, offset + size))
        offset += size
    body = json.dumps(entries, separators=(",", ":")).encode()
    body += b" " * (-len(body) % HEADER_ALIGNMENT)
    header = struct.pack("<Q", len(body)) + body
    base = len(header)
    slots = {n: TensorSlot(n, d, s, base + a, base + b) for n, d, s, a, b in spans}
    return FileLayout(header, slots, base + offset)


def aligned(file_layout: FileLayout) -> bool:
    """Whether every tensor starts at a multiple of its element size (what loaders that view the file's bytes
    as the tensor's dtype need; the library's order guarantees it). Pure."""
    return all(slot.start % slot.dtype.itemsize == 0 for slot in file_layout.slots.values())


DIRECT_ALIGNMENT = 4096  # O_DIRECT wants buffer, offset and length on the device's logical blocks (<= 4 KiB)
STAGE_BYTES = 32 * 2**20  # one O_DIRECT write
HOLD_BYTES = 64 * 2**20  # blocks held until their turn (a weight's scales), per file


class StageBuffer:
    """A page-aligned buffer that gathers a file's bytes into large O_DIRECT writes; one per writer thread,
    reused from file to file (its pages are touched once)."""

    def __init__(self, nbytes: int = STAGE_BYTES) -> None:
        self.memory = mmap.mmap(-1, nbytes)  # anonymous maps are page-aligned
        self.tensor = torch.frombuffer(self.memory, dtype=torch.uint8)
        self.view = memoryview(self.memory)

    def __len__(self) -> int:
        return len(self.memory)


class SafetensorsWriter:
    """Writes a file laid out by `layout`, one tensor at a time; fsyncs on close and returns its sha256.

    Tensors in file order are hashed as they go. With a `stage` buffer and a file system that takes O_DIRECT,
    their bytes are gathered in the buffer and written in large aligned blocks past the page cache: no copy into
    cache pages the kernel first has to allocate, and no cache growing by the size of the output (the last block
    is padded, then the file truncated to its size). Otherwise, or when the file system refuses an O_DIRECT write,
    they go through the page cache as they are. A tensor out of file order turns the rest of the file to the page
    cache, and the file is read back once to hash it (the plan lays out and orders every file so this does not
    happen: see write/rank.py's file_layout).
    """

    def __init__(self, path: Path, file_layout: FileLayout, stage: StageBuffer | None = None) -> None:
        self.path = path
        self.layout = file_layout
        self.written: set[str] = set()
        self.rows: dict[str, int] = {}  # rows written so far of tensors written in blocks
        self.held: dict[int, torch.Tensor] = {}  # bytes that came before their turn, by file offset (HOLD_BYTES)
        self.held_bytes = 0
        self.position = 0  # bytes handed over in file order so far
        self.in_order = True  # every tensor so far came in file order: the digest is the file's
        self.digest = hashlib.sha256()
        self.stage = stage
        self.staged = 0  # bytes waiting in the stage buffer, which starts at file offset position - staged
        self.fd, self.direct = open_output(path, direct=stage is not None)
        os.ftruncate(self.fd, file_layout.size)
        self._append(torch.frombuffer(bytearray(file_layout.header), dtype=torch.uint8))

    def write(self, name: str, tensor: torch.Tensor, row: int | None = None) -> None:
        """Write `tensor` (CPU, the planned dtype) into its slot: the whole tensor, or (`row`) a block of its rows
        starting at that row. A block that comes before its turn is held until the bytes before it are written,
        up to HOLD_BYTES (a weight's scales, written after its data); beyond that the file leaves file order."""
        slot = self.layout.slots[name]
        whole = row is None
        if tensor.dtype != slot.dtype or (
            tuple(tensor.shape) != slot.shape
            if whole
            else tuple(tensor.shape[1:]) != slot.shape[1:] or row + tensor.shape[0] > slot.shape[0]
        ):
            got = f"{tensor.dtype} {list(tensor.shape)}" + ("" if whole else f" at row {row}")
            raise ValueError(f"tensor {name!r} is {got}, planned {slot.dtype} {list(slot.shape)}")
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        offset = slot.start if whole else slot.start + row * (slot.end - slot.start) // max(1, slot.shape[0])
        self._place(data, offset)
        if not whole:
            self.rows[name] = self.rows.get(name, 0) + tensor.shape[0]
        if whole or self.rows[name] == slot.shape[0]:
            self.written.add(name)

    def _place(self, data: torch.Tensor, offset: int) -> None:
        if self.in_order and offset == self.position:
            self._append(data)
            while self.position in self.held:
                early = self.held.pop(self.position)
                self.held_bytes -= early.numel()
                self._append(early)
        elif self.in_order and offset > self.position and self.held_bytes + data.numel() <= HOLD_BYTES:
            self.held[offset] = data
            self.held_bytes += data.numel()
        else:
            self._leave_order()
            self._pwrite(memoryview(data.numpy()), offset)

    def _leave_order(self) -> None:
        """Write what is staged and go on through the page cache, at each tensor's offset."""
        if not self.in_order:
            return
        if self.direct:
            self._leave_direct()
        if self.staged:
            self._flush()
        self.in_order = False
        for offset, early in sorted(self.held.items()):
            self._pwrite(memoryview(early.numpy()), offset)
        self.held.clear()
        self.held_bytes = 0

    def _append(self, data: torch.Tensor) -> None:
        """The next bytes of the file: hashed, then written (or staged)."""
        self.digest.update(memoryview(data.numpy()))
        if not self.direct:
            self._pwrite(memoryview(data.numpy()), self.position)
            self.position += data.numel()
            return
        done = 0
        while done < data.numel():
            n = min(data.numel() - done, len(self.stage) - self.staged)
            self.stage.tensor[self.staged : self.staged + n].copy_(data[done : done + n])
            self.staged += n
            done += n
            self.position += n
            if self.staged == len(self.stage):
                self._flush()

    def _flush(self) -> None:
        """Write the staged bytes at their offset (with O_DIRECT: padded to whole blocks)."""
        start = self.position - self.staged
        if self.direct:
            padded = -(-self.staged // DIRECT_ALIGNMENT) * DIRECT_ALIGNMENT
            self.stage.tensor[self.staged : padded].zero_()
            try:
                self._pwrite(self.stage.view[:padded], start)
                self.staged = 0
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._leave_direct()  # the file system took the open but not the write
        self._pwrite(self.stage.view[: self.staged], start)
        self.staged = 0

    def _leave_direct(self) -> None:
        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.direct = False

    def _pwrite(self, data: memoryview, offset: int) -> None:
        while len(data):
            n = os.pwrite(self.fd, data, offset)
            data, offset = data[n:], offset + n

    def close(self) -> str:
        """Check every tensor was written, fsync and close. Returns the file's sha256 (hex)."""
        try:
            missing = self.layout.slots.keys() - self.written
            if missing:
                raise RuntimeError(f"{self.path.name}: {len(missing)} tensor(s) never written, e.g. {min(missing)}")
            if self.staged:
                self._flush()
            os.ftruncate(self.fd, self.layout.size)  # drops the last block's padding
            os.fsync(self.fd)
        finally:
            os.close(self.fd)
        return self.digest.hexdigest() if self.in_order else file_sha256(self.path)

    def abort(self) -> None:
        os.close(self.fd)


def open_output(path: Path, direct: bool) -> tuple[int, bool]:
    """Open `path` for writing, with O_DIRECT when asked and the platform and file system take it."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, flags | os.O_DIRECT, 0o644), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: this file system has no O_DIRECT (tmpfs on older kernels)
                raise
    return os.open(path, flags, 0o644), False


def file_sha256(path: Path, block: int = 16 * 2**20) -> str:
    """sha256 of a file, read in blocks (the same digest the Hub records for LFS files)."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()
