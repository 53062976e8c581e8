"""JSON files: read as an object with one clear error, written the way transformers writes them."""

from __future__ import annotations

import json
import os
from pathlib import Path

from distfinalize.errors import DistfinalizeError


def write_json(path: Path, data: object) -> Path:
    """Write `data` to `path` and fsync it. Returns the path."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return path


def read_json_object(path: Path, error: type[DistfinalizeError], what: str) -> dict:
    """A JSON object from `path`; anything else raises `error` naming `what` and the file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise error(f"cannot read {what}", where=path, hint=str(exc)) from exc
    if not isinstance(data, dict):
        raise error(f"{what} is not a JSON object", where=path)
    return data
