"""A safetensors file's layout from names, shapes and dtypes alone: the header bytes and every tensor's slot.

The layout is the library's own: 8-byte little-endian header length, JSON header padded with spaces to a
multiple of 8, data sorted by alignment then name (or, for files with quantized weights, in the order given
when that keeps every tensor aligned). Pure: the plan cuts files into byte ranges with it, the writer writes by it.
Runs on: every rank.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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

    @property
    def data_start(self) -> int:
        """Where the data region starts (the header's length)."""
        return len(self.header)


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


def grouped_layout(
    tensors: Sequence[tuple[str, tuple[int, ...], torch.dtype]], metadata: Mapping[str, str] | None, grouped: bool
) -> FileLayout:
    """The library's layout, or with `grouped` the order given when it keeps every tensor aligned. Pure."""
    header = {**DEFAULT_METADATA, **(metadata or {})}
    if grouped:
        given = layout(tensors, header, as_given=True)
        if aligned(given):
            return given
    return layout(tensors, header)
