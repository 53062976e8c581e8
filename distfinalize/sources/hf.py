"""A local Hugging Face model dir (safetensors) as a source of single tensors, and a source that adds one to a
checkpoint: `--merge-lora` of an adapter-only checkpoint takes its base weights from `--base-model DIR`.

Only headers are read to describe the dir; a reader opens the files with safetensors' `safe_open` and reads only
the tensors asked for. Runs on: all ranks (metadata), each rank for its own tensors (reads).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import _TYPES as SAFETENSORS_DTYPES

from distfinalize.errors import SourceError
from distfinalize.hfnames import INDEX_FILE, SINGLE_FILE
from distfinalize.sources import Source, SourceInfo, TensorMeta, TensorReader

BASE_KEY_PREFIX = "base-model:"  # keys of tensors read from --base-model (DCP keys never hold a colon)


class HFModelDir:
    """The tensors of a local model dir, by name, and the file each lives in. Runs on: all ranks."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.files = weight_files(path)
        self.tensors: dict[str, TensorMeta] = {}
        for file in dict.fromkeys(self.files.values()):
            try:
                with safe_open(str(path / file), framework="pt") as f:
                    for name in f.keys():  # noqa: SIM118  (safe_open has no __iter__)
                        view = f.get_slice(name)
                        dtype = SAFETENSORS_DTYPES[view.get_dtype()]
                        self.tensors[name] = TensorMeta(BASE_KEY_PREFIX + name, name, tuple(view.get_shape()), dtype)
            except (OSError, SafetensorError, KeyError) as exc:
                hint = f"{exc}; pass a complete Hugging Face model dir as --base-model"
                raise SourceError("cannot read the safetensors header", where=path / file, hint=hint) from exc

    def read(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Read `names` (stored dtype, CPU), opening each file once."""
        out: dict[str, torch.Tensor] = {}
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        for file, group in by_file.items():
            try:
                with safe_open(str(self.path / file), framework="pt") as f:
                    out.update({name: f.get_tensor(name) for name in group})
            except (OSError, SafetensorError) as exc:
                raise SourceError("cannot read base weights", where=self.path / file, hint=str(exc)) from exc
        return out

    def row_cuts(self, name: str) -> None:
        """None: any block of rows is read exactly."""
        return None

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of `name` (stored dtype, CPU)."""
        try:
            with safe_open(str(self.path / self.files[name]), framework="pt") as f:
                view = f.get_slice(name)
                return view[start:stop] if view.get_shape() else f.get_tensor(name)
        except (OSError, SafetensorError) as exc:
            raise SourceError("cannot read base weights", where=self.path / self.files[name], hint=str(exc)) from exc


def weight_files(path: Path) -> dict[str, str]:
    """Tensor name -> file, from model.safetensors.index.json or a single model.safetensors."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SourceError("cannot read the safetensors index", where=index, hint=str(exc)) from exc
        return {str(name): str(file) for name, file in weight_map.items()}
    if (path / SINGLE_FILE).is_file():
        with safe_open(str(path / SINGLE_FILE), framework="pt") as f:
            return dict.fromkeys(f.keys(), SINGLE_FILE)
    raise SourceError(
        "--base-model has no safetensors weights",
        where=path,
        hint=f"expected {SINGLE_FILE} or {INDEX_FILE} in it (save the base model with save_pretrained)",
    )


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
