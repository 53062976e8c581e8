"""The leaf every stage may import: Hugging Face file names, dtype tables, and JSON io (a file read as an object
with one clear error, written the way transformers writes them)."""

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
        raise error(
            f"{what} is not a JSON object",
            where=path,
            hint=f"it holds a JSON {type(data).__name__}; a {what} is a mapping {{...}}",
        )
    return data


SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ADAPTER_FILE = "adapter_model.safetensors"  # a PEFT adapter dir's one weight file
ADAPTER_CONFIG = "adapter_config.json"

DTYPE_NAMES = ("bfloat16", "float16", "float32")  # --dtype's choices; DTYPES maps them to torch dtypes


def __getattr__(name: str) -> object:
    """SAFETENSORS_DTYPES and DTYPES, built on first use: importing this module does not import torch, so the
    command line answers --help and usage errors without it."""
    if name not in ("SAFETENSORS_DTYPES", "DTYPES"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import torch

    # safetensors dtype codes (safetensors/src/tensor.rs), checked against the library in the unit tests.
    tables: dict[str, dict] = {
        "SAFETENSORS_DTYPES": {
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
        },
        "DTYPES": {n: getattr(torch, n) for n in DTYPE_NAMES},
    }
    globals().update(tables)
    return tables[name]


ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
