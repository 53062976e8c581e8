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
    """A JSON object from `path`; anything else raises `error` naming `what`, the file and, for a file that does
    not parse, the JSON error and its line and column."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        hint = f"{exc.msg} at line {exc.lineno} column {exc.colno}; fix or replace the file"
        raise error(f"{what} is not valid JSON", where=path, hint=hint) from exc
    except (OSError, ValueError) as exc:  # ValueError: not UTF-8
        raise error(f"cannot read {what}", where=path, hint=getattr(exc, "strerror", None) or str(exc)) from exc
    if not isinstance(data, dict):
        raise error(f"{what} is not a JSON object", where=path,
                    hint=f"it holds a JSON {type(data).__name__}; a {what} is a mapping {{...}}")  # fmt: skip
    return data
