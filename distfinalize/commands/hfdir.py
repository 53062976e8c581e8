"""A Hugging Face model dir on disk, read strictly: its weight files, their safetensors headers, the index and
distfinalize's manifest. Used by `verify` (every rank surveys DEST) and `inspect` (a model dir as SRC).
Only small reads: headers and JSON files, never tensor data.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distfinalize.commit.manifest import MANIFEST
from distfinalize.errors import DestinationError
from distfinalize.hfnames import ADAPTER_CONFIG, ADAPTER_FILE, DTYPES, INDEX_FILE, SINGLE_FILE
from distfinalize.sources.safetensors_header import (  # noqa: F401  (re-exported for verify, inspect, compare)
    Header,
    HeaderError,
    TensorEntry,
    read_header,
    unique_pairs,
)


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
    return json.loads(path.read_text(), object_pairs_hook=unique_pairs)


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
        if not isinstance(entry, dict) or not isinstance(entry.get("size"), int):
            return f"{MANIFEST}: the entry of {name!r} has no size"
        if "pieces" in entry:
            if not pieces_cover(entry["pieces"], entry["size"]):
                return f"{MANIFEST}: the pieces of {name!r} are not [start, stop, sha256] ranges covering the file"
        elif not isinstance(entry.get("sha256"), str):
            return f"{MANIFEST}: the entry of {name!r} has no sha256"
    return None


def pieces_cover(pieces: object, size: int) -> bool:
    """Whether a manifest's "pieces" are [start, stop, sha256] byte ranges covering [0, size) in order. Pure."""
    if not isinstance(pieces, list) or not pieces:
        return False
    position = 0
    for piece in pieces:
        if not (isinstance(piece, list) and len(piece) == 3 and isinstance(piece[2], str)):
            return False
        if not all(isinstance(x, int) for x in piece[:2]) or piece[0] != position or piece[1] < piece[0]:
            return False
        position = piece[1]
    return position == size


def config_dtype(config: Mapping[str, Any] | None) -> str | None:
    if config is None:
        return None
    value = config.get("dtype") or config.get("torch_dtype")
    return value if value in DTYPES else None
