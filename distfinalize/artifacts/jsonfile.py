"""JSON written the way transformers writes it (indent 2, sorted keys, trailing newline), fsynced."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json(path: Path, data: object) -> Path:
    """Write `data` to `path` and fsync it. Returns the path."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return path
