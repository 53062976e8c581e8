"""config.json for the output: the source's, with dtype and tied embeddings set to what was written.

Runs on: rank 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from distfinalize.artifacts.jsonfile import write_json

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def output_config(source_config: Path, dtype: torch.dtype | None, tied: bool, architecture: str | None) -> dict:
    """The source config.json with `dtype` (and `torch_dtype` for older readers) and tying updated.

    `architectures` is kept; when the source has none, the class the names were checked against is recorded.
    """
    config = json.loads(source_config.read_text())
    if not config.get("architectures") and architecture:
        config["architectures"] = [architecture]
    name = DTYPE_NAMES.get(dtype) if dtype is not None else None
    if name is not None:
        config["dtype"] = name
        if "torch_dtype" in config:
            config["torch_dtype"] = name
    if tied:
        config["tie_word_embeddings"] = True
    return config


def write_config(
    source_config: Path, directory: Path, dtype: torch.dtype | None, tied: bool, architecture: str | None
) -> Path:
    """Write the output config.json into `directory`."""
    return write_json(directory / "config.json", output_config(source_config, dtype, tied, architecture))
