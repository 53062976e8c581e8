"""Write one safetensors file, streaming: the header is known from the plan, tensors go to their offsets.

The safetensors library serializes a whole file from memory at once; writing tensor by tensor at
precomputed offsets keeps a rank's memory to the tensors in flight instead of the whole file.
The layout is the library's own: 8-byte little-endian header length, JSON header padded with spaces
to a multiple of 8, data sorted by alignment then name. Runs on: the rank that owns the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

# safetensors dtype codes (safetensors/src/tensor.rs), checked against the library in the unit tests.
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
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
    tensors: Sequence[tuple[str, tuple[int, ...], torch.dtype]], metadata: Mapping[str, str] | None = None
) -> FileLayout:
    """Compute the file layout from (name, shape, dtype) alone. Pure."""
    for name, _, dtype in tensors:
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {dtype}, which safetensors cannot store")
    ordered = sorted(tensors, key=lambda t: (-SAFETENSORS_ORDER.index(SAFETENSORS_DTYPES[t[2]]), t[0]))
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


class SafetensorsWriter:
    """Writes a file laid out by `layout`, one tensor at a time; fsyncs on close and returns its sha256.

    Tensors may come in any order; written in file order (as `write_file` does), the sha256 is computed on
    the fly, otherwise the file is read back once to hash it.
    """

    def __init__(self, path: Path, file_layout: FileLayout) -> None:
        self.path = path
        self.layout = file_layout
        self.written: set[str] = set()
        self.digest = hashlib.sha256(file_layout.header)
        self.hashed_to = len(file_layout.header)  # bytes hashed so far; -1 once writes went out of order
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self.fd, file_layout.size)
        self._pwrite(memoryview(file_layout.header), 0)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write `tensor` (CPU, the planned dtype and shape) into its slot."""
        slot = self.layout.slots[name]
        if tensor.dtype != slot.dtype or tuple(tensor.shape) != slot.shape:
            raise ValueError(
                f"tensor {name!r} is {tensor.dtype} {list(tensor.shape)}, planned {slot.dtype} {list(slot.shape)}"
            )
        data = memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
        self._pwrite(data, slot.start)
        if self.hashed_to == slot.start:
            self.digest.update(data)
            self.hashed_to = slot.end
        else:
            self.hashed_to = -1
        self.written.add(name)

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
            os.fsync(self.fd)
        finally:
            os.close(self.fd)
        if self.hashed_to == self.layout.size:
            return self.digest.hexdigest()
        return file_sha256(self.path)

    def abort(self) -> None:
        os.close(self.fd)


def file_sha256(path: Path, block: int = 16 * 2**20) -> str:
    """sha256 of a file, read in blocks (the same digest the Hub records for LFS files)."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()
