"""config.json for the output: the source's (or --base-model's), updated to what was written.

`dtype` (and `torch_dtype` for older readers), `vocab_size`, `tie_word_embeddings`, bos/eos/pad ids synced to
the final tokenizer, and the `quantization_config` of a --quantize recipe; `architectures` kept (filled in
when missing). Runs on: rank 0.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from distfinalize.hfnames import write_json

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclass(frozen=True)
class ConfigUpdates:
    """What finalize changed about the model, to be recorded in config.json."""

    dtype: torch.dtype | None = None
    tied: bool = False  # lm_head found identical to embed_tokens and written once
    architecture: str | None = None
    vocab_size: int | None = None
    token_ids: Mapping[str, int | None] = field(default_factory=dict)  # bos/eos/pad_token_id
    quantization_config: Mapping[str, object] | None = None  # the --quantize recipe's block


def output_config(source_config: Path, updates: ConfigUpdates) -> dict:
    """The source config.json with the updates applied."""
    config = json.loads(source_config.read_text())
    if not config.get("architectures") and updates.architecture:
        config["architectures"] = [updates.architecture]
    name = DTYPE_NAMES.get(updates.dtype) if updates.dtype is not None else None
    if name is not None:
        config["dtype"] = name
        config["torch_dtype"] = name
    if updates.tied:
        config["tie_word_embeddings"] = True
    if updates.vocab_size is not None:
        config["vocab_size"] = updates.vocab_size
    for key, value in updates.token_ids.items():
        if value is not None:
            config[key] = value
    if updates.quantization_config is not None:
        config["quantization_config"] = dict(updates.quantization_config)
    return config


def write_config(source_config: Path, directory: Path, updates: ConfigUpdates) -> Path:
    """Write the output config.json into `directory`."""
    return write_json(directory / "config.json", output_config(source_config, updates))
