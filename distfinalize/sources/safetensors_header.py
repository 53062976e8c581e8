"""A safetensors file's header, parsed strictly: every tensor's dtype, shape and byte range, checked to tile the
data that follows the header exactly (nothing overlaps, nothing runs past the end of the file, nothing is left
over). Used by the safetensors source (where each tensor lies) and by `verify` / `inspect` (what DEST holds).
Only the header is read, never tensor data. Runs on: any rank.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distfinalize.hfnames import ITEMSIZE

MAX_HEADER_SIZE = 100_000_000  # the safetensors library refuses larger headers
LENGTH_BYTES = 8  # the header starts with its length, a little-endian u64


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header."""

    dtype: str  # the safetensors code: F32, BF16, ...
    shape: tuple[int, ...]
    nbytes: int
    start: int = field(default=0, compare=False)  # its first byte in the file (header included)


@dataclass(frozen=True)
class Header:
    tensors: Mapping[str, TensorEntry]
    metadata: Mapping[str, str]


class HeaderError(ValueError):
    """A safetensors header that does not parse, or does not describe its file."""


def read_header(path: Path, check_library: bool = True) -> Header:
    """Parse a safetensors header strictly, then (when `check_library`) let the library open the file too.
    Raises HeaderError."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(LENGTH_BYTES)
            if len(prefix) < LENGTH_BYTES:
                raise HeaderError(f"{size} bytes: too short for a safetensors file")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(MAX_HEADER_SIZE, size - LENGTH_BYTES):
                raise HeaderError(f"header length {length} runs past the {size}-byte file")
            raw = f.read(length)
        entries = json.loads(raw, object_pairs_hook=unique_pairs)
    except OSError as exc:
        raise HeaderError(f"cannot read: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise HeaderError(f"header is not JSON ({exc})") from exc
    header = header_entries(entries, size - LENGTH_BYTES - length, LENGTH_BYTES + length)
    if check_library:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                names = set(f.keys())
        except (SafetensorError, OSError) as exc:
            raise HeaderError(f"safetensors refuses it ({exc})") from exc
        if names != set(header.tensors):
            raise HeaderError("safetensors reads other tensor names than the header holds")
    return header


def unique_pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object hook where a key given twice is an error (json.loads would keep the last one silently)."""
    out: dict[str, Any] = {}
    for key, value in items:
        if key in out:
            raise ValueError(f"{key!r} appears twice")
        out[key] = value
    return out


def header_entries(entries: object, data_size: int, data_start: int = 0) -> Header:
    """Validate the parsed header against the `data_size` bytes that follow it (from byte `data_start`). Pure."""
    if not isinstance(entries, dict):
        raise HeaderError("header is not a JSON object")
    metadata = entries.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise HeaderError("__metadata__ is not a mapping of strings")
    tensors, spans = {}, []
    for name, entry in entries.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            if not all(isinstance(d, int) and d >= 0 for d in (*shape, start, end)) or end < start:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise HeaderError(f"tensor {name!r} has a malformed entry") from None
        numel = 1
        for d in shape:
            numel *= d
        if code in ITEMSIZE and end - start != numel * ITEMSIZE[code]:
            raise HeaderError(f"tensor {name!r} is {code} {list(shape)} but spans {end - start} bytes")
        tensors[name] = TensorEntry(code, shape, end - start, data_start + start)
        spans.append((start, end, name))
    position = 0
    for start, end, name in sorted(spans):
        if start != position:
            raise HeaderError(f"tensor {name!r} starts at byte {start} of the data, expected {position}")
        position = end
    if position != data_size:
        raise HeaderError(f"the tensors cover {position} bytes but the file holds {data_size} bytes of data")
    return Header(tensors, metadata)
