"""A Hugging Face model dir on disk, read strictly: its weight files, their safetensors headers, the index and
distfinalize's manifest. Used by `verify` (every rank surveys DEST) and `inspect` (a model dir as SRC).
Only small reads: headers and JSON files, never tensor data.
"""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distfinalize.commit.manifest import MANIFEST
from distfinalize.errors import DestinationError
from distfinalize.hfnames import ADAPTER_CONFIG, ADAPTER_FILE, DTYPES, INDEX_FILE, ITEMSIZE, SINGLE_FILE

MAX_HEADER_SIZE = 100_000_000  # the safetensors library refuses larger headers


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header."""

    dtype: str  # the safetensors code: F32, BF16, ...
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class Header:
    tensors: Mapping[str, TensorEntry]
    metadata: Mapping[str, str]


class HeaderError(ValueError):
    """A safetensors header that does not parse, or does not describe its file."""


@dataclass(frozen=True)
class WeightFile:
    """A weight file of DEST: its name as transformers sees it, the file behind it, and its manifest key."""

    name: str
    path: Path
    size: int
    manifest_key: str


@dataclass(frozen=True)
class Survey:
    """What DEST holds, read from its listing, index and manifest. Identical on every rank."""

    dest: Path
    files: tuple[WeightFile, ...]
    missing: tuple[str, ...]  # weight files the index (or the single-file layout) names that are not there
    index: Mapping[str, Any] | None
    index_error: str | None
    manifest: Mapping[str, Any] | None
    manifest_error: str | None
    config: Mapping[str, Any] | None  # config.json, as JSON (loaded with transformers by rank 0)
    single_file: str = SINGLE_FILE  # the one weight file when there is no index (adapter_model.safetensors for PEFT)


def read_json_strict(path: Path) -> Any:
    """JSON where a key given twice is an error (json.loads would keep the last one silently)."""
    return json.loads(path.read_text(), object_pairs_hook=_unique_pairs)


def read_header(path: Path) -> Header:
    """Parse a safetensors header strictly, then let the library open the file. Raises HeaderError."""
    from safetensors import SafetensorError, safe_open

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise HeaderError(f"{size} bytes: too short for a safetensors file")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(MAX_HEADER_SIZE, size - 8):
                raise HeaderError(f"header length {length} runs past the {size}-byte file")
            raw = f.read(length)
        entries = json.loads(raw, object_pairs_hook=_unique_pairs)
    except OSError as exc:
        raise HeaderError(f"cannot read: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise HeaderError(f"header is not JSON ({exc})") from exc
    header = _header_entries(entries, size - 8 - length)
    try:
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
    except (SafetensorError, OSError) as exc:
        raise HeaderError(f"safetensors refuses it ({exc})") from exc
    if names != set(header.tensors):
        raise HeaderError("safetensors reads other tensor names than the header holds")
    return header


def _unique_pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in items:
        if key in out:
            raise ValueError(f"{key!r} appears twice")
        out[key] = value
    return out


def _header_entries(entries: object, data_size: int) -> Header:
    """Validate the parsed header against the data that follows it. Pure."""
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
        tensors[name] = TensorEntry(code, shape, end - start)
        spans.append((start, end, name))
    position = 0
    for start, end, name in sorted(spans):
        if start != position:
            raise HeaderError(f"tensor {name!r} starts at byte {start} of the data, expected {position}")
        position = end
    if position != data_size:
        raise HeaderError(f"the tensors cover {position} bytes but the file holds {data_size} bytes of data")
    return Header(tensors, metadata)


def survey(dest: Path) -> Survey:
    """List DEST's weight files (what transformers would load) and read its index, manifest and config.

    Runs on: every rank (small reads; the result is the same everywhere).
    """
    if not dest.is_dir():
        raise DestinationError("DEST is not a directory", where=dest, hint="pass the finalized model dir")
    root = dest.resolve()
    index, index_error = None, None
    if (dest / INDEX_FILE).exists():
        try:
            index = read_json_strict(dest / INDEX_FILE)
            index_error = _index_shape_error(index)
        except (OSError, ValueError) as exc:
            index_error = f"{INDEX_FILE} does not parse ({exc})"
    names = {p.name for p in dest.glob("*.safetensors")}
    named = set()
    if index is not None and index_error is None:
        named = set(index["weight_map"].values())
    single = ADAPTER_FILE if (dest / ADAPTER_CONFIG).is_file() else SINGLE_FILE
    if index is None:
        named = {single}
    files, missing = [], []
    for name in sorted(names | named):
        path = dest / name
        if not path.is_file():
            missing.append(name)
            continue
        resolved = path.resolve()
        key = str(resolved.relative_to(root)) if resolved.is_relative_to(root) else str(resolved)
        files.append(WeightFile(name, resolved, resolved.stat().st_size, key))
    manifest, manifest_error = None, None
    if not (dest / MANIFEST).exists():
        manifest_error = (
            f"no {MANIFEST}: the checksums cannot be checked (DEST was not written by distfinalize, or the file "
            "was removed)"
        )
    else:
        try:
            manifest = read_json_strict(dest / MANIFEST)
            manifest_error = _manifest_shape_error(manifest)
        except (OSError, ValueError) as exc:
            manifest_error = f"{MANIFEST} does not parse ({exc})"
    config = None
    with contextlib.suppress(OSError, ValueError):
        config = json.loads((dest / "config.json").read_text())
    return Survey(
        dest,
        tuple(files),
        tuple(missing),
        index,
        index_error,
        manifest if manifest_error is None else None,
        manifest_error,
        config if isinstance(config, dict) else None,
        single,
    )


def _index_shape_error(index: object) -> str | None:
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        return f"{INDEX_FILE} has no weight_map"
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in index["weight_map"].items()):
        return f"{INDEX_FILE}: weight_map must map tensor names to file names"
    if any("/" in v or v in (".", "..") for v in index["weight_map"].values()):
        return f"{INDEX_FILE}: weight_map names a file outside DEST"
    metadata = index.get("metadata")
    if not isinstance(metadata, dict) or not isinstance(metadata.get("total_size"), int):
        return f"{INDEX_FILE} has no integer metadata.total_size"
    return None


def _manifest_shape_error(manifest: object) -> str | None:
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        return f"{MANIFEST} has no files mapping"
    for name, entry in files.items():
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("size"), int)
            or not isinstance(entry.get("sha256"), str)
        ):
            return f"{MANIFEST}: the entry of {name!r} has no sha256"
    return None


def config_dtype(config: Mapping[str, Any] | None) -> str | None:
    if config is None:
        return None
    value = config.get("dtype") or config.get("torch_dtype")
    return value if value in DTYPES else None
