"""A local Hugging Face model dir (safetensors) as a source of single tensors, and a source that adds one to a
checkpoint: `--merge-lora` of an adapter-only checkpoint takes its base weights from `--base-model DIR`.

Only headers are read to describe the dir, and a reader reads only the tensors asked for (safetensors_dir.py).
Runs on: all ranks (metadata), each rank for its own tensors (reads).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from distfinalize.errors import SourceError
from distfinalize.hfnames import INDEX_FILE, SINGLE_FILE
from distfinalize.sources import Source, SourceInfo, TensorMeta, TensorReader
from distfinalize.sources.safetensors_dir import SafetensorsSource, is_safetensors_dir

BASE_KEY_PREFIX = "base-model:"  # keys of tensors read from --base-model (DCP keys never hold a colon)


class HFModelDir:
    """The tensors of a local model dir, by name, described and read as the safetensors source does (headers
    parsed strictly, each tensor read at its byte range). Runs on: all ranks."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if not is_safetensors_dir(path):
            raise SourceError(
                "--base-model has no safetensors weights",
                where=path,
                hint=f"expected {SINGLE_FILE} or {INDEX_FILE} in it (save the base model with save_pretrained)",
            )
        self.source = SafetensorsSource(path)
        self.tensors: dict[str, TensorMeta] = {
            t.name: replace(t, key=BASE_KEY_PREFIX + t.name) for t in self.source.tensors
        }

    def read(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Read `names` (stored dtype, CPU), opening each file once."""
        return self.source.reader().read(names)

    def row_cuts(self, name: str) -> Sequence[int] | None:
        return self.source.reader().row_cuts(name)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of `name` (stored dtype, CPU)."""
        return self.source.reader().read_rows(name, start, stop)


class WithBaseModel:
    """A checkpoint plus the tensors of a base model dir: keys starting with BASE_KEY_PREFIX come from the dir."""

    def __init__(self, checkpoint: Source, base: HFModelDir, tensors: tuple[TensorMeta, ...]) -> None:
        self.checkpoint = checkpoint
        self.base = base
        self.info: SourceInfo = checkpoint.info
        self.tensors = tensors
        self.metadata = getattr(checkpoint, "metadata", None)  # DCP metadata, for --keep-optimizer

    def reader(self) -> TensorReader:
        return _CombinedReader(self.checkpoint.reader(), self.base)

    def chunks(self):
        """The checkpoint's chunks (a chunked format's); tensors from the base dir have none."""
        return self.checkpoint.chunks()


class _CombinedReader:
    def __init__(self, checkpoint: TensorReader, base: HFModelDir) -> None:
        self.checkpoint = checkpoint
        self.base = base

    def read(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        base = [k for k in keys if k.startswith(BASE_KEY_PREFIX)]
        own = [k for k in keys if not k.startswith(BASE_KEY_PREFIX)]
        out = self.checkpoint.read(own) if own else {}
        read = self.base.read([k.removeprefix(BASE_KEY_PREFIX) for k in base]) if base else {}
        out.update({BASE_KEY_PREFIX + name: tensor for name, tensor in read.items()})
        return out

    def row_cuts(self, key: str) -> list[int] | None:
        if key.startswith(BASE_KEY_PREFIX):
            return self.base.row_cuts(key.removeprefix(BASE_KEY_PREFIX))
        return self.checkpoint.row_cuts(key)

    def read_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        if key.startswith(BASE_KEY_PREFIX):
            return self.base.read_rows(key.removeprefix(BASE_KEY_PREFIX), start, stop)
        return self.checkpoint.read_rows(key, start, stop)
