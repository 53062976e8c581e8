"""A Hugging Face model dir saved with torch.save: pytorch_model.bin, or shards and pytorch_model.bin.index.json
(save_pretrained(safe_serialization=False), the Trainer's `save_safetensors=False` in transformers 4.x).

Each file is a torch.save zip. It is only ever opened with `weights_only=True`, which unpickles tensors, plain
containers and numbers, and refuses any other object the pickle names (a file holding one is refused, naming
the class). Legacy (pre-zip) torch.save files, which cannot be mapped, are refused. The description comes from
`torch.load(map_location="meta")`: the pickle alone, no tensor data. A reader maps a file with
`torch.load(mmap=True)` and touches only the pages of the tensors it was asked for; a rank opens only the files
that hold its tensors. Runs on: all ranks (description), each rank for its own tensors (reads).
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path

import torch

from distfinalize.errors import SourceError
from distfinalize.sources import SourceFormat, SourceInfo, TensorMeta
from distfinalize.sources.safetensors_dir import indexed_files

BIN_FILE = "pytorch_model.bin"
BIN_INDEX_FILE = "pytorch_model.bin.index.json"
UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def is_torch_bin_dir(path: Path) -> bool:
    """A model dir with pytorch_model.bin or its index (names only)."""
    return (path / BIN_FILE).is_file() or (path / BIN_INDEX_FILE).is_file()


def bin_files(path: Path) -> tuple[list[str], dict[str, str] | None]:
    """The .bin files to read, and the index's tensor name -> file map when there is an index."""
    if (path / BIN_INDEX_FILE).is_file():
        return indexed_files(path, BIN_INDEX_FILE)
    return [BIN_FILE], None


def load_weights(path: Path, map_location: str, mmap: bool) -> dict[str, torch.Tensor]:
    """A .bin file's state dict, unpickled with weights_only=True; anything else is one SourceError naming it."""
    try:
        data = torch.load(str(path), map_location=map_location, weights_only=True, mmap=mmap)
    except OSError as exc:
        raise SourceError("cannot read a weight file", where=path, hint=exc.strerror or str(exc)) from exc
    except pickle.UnpicklingError as exc:
        found = UNSUPPORTED_GLOBAL.search(str(exc))
        what = f"an object of class {found.group(1)}" if found else "objects other than tensors"
        raise SourceError(
            f"the weight file holds {what}, which distfinalize never unpickles (torch.load weights_only=True)",
            where=path,
            hint="save the model's state dict alone (save_pretrained) and finalize that",
        ) from exc
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, KeyError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SourceError(
            "not a readable torch.save file",
            where=path,
            hint=f"it may be truncated or corrupt ({first}); restore it or save the model again",
        ) from exc
    if not isinstance(data, dict):
        raise SourceError(
            f"the weight file holds a {type(data).__name__}, not a state dict", where=path, hint="save a state dict"
        )
    return data


class TorchBinSource:
    """pytorch_model.bin file(s), described from their pickles alone. Runs on: all ranks."""

    def __init__(self, path: Path, step: int | None = None) -> None:
        self.path = path
        files, index = bin_files(path)
        self.files: dict[str, str] = {}
        tensors, skipped = [], 0
        for file in files:
            weights = load_weights(path / file, "meta", mmap=False)
            if not zipfile.is_zipfile(path / file):
                raise SourceError(
                    "a legacy (non-zip) torch.save file, which cannot be memory-mapped",
                    where=path / file,
                    hint="load it and save it again with a torch newer than 1.6, or with save_pretrained",
                )
            for name, value in weights.items():
                if not isinstance(value, torch.Tensor) or not isinstance(name, str):
                    skipped += 1
                    continue
                if index is not None and index.get(name) != file:
                    continue  # the index says which file holds it
                if name in self.files:
                    raise SourceError(f"{name!r} is stored in both {self.files[name]} and {file}", where=path)
                self.files[name] = file
                tensors.append(TensorMeta(name, name, tuple(value.shape), value.dtype))
        if index is not None:
            absent = [name for name in index if name not in self.files]
            if absent:
                raise SourceError(
                    f"{BIN_INDEX_FILE} places {absent[0]!r} in {index[absent[0]]}, which does not hold it",
                    where=path,
                    hint="the index does not match its files; save the model again",
                )
        if not tensors:
            raise SourceError("the weight files hold no tensors", where=path, hint="point SRC at a saved model")
        self.tensors = tuple(tensors)
        self.info = SourceInfo("pytorch-bin", path, step, None, skipped)

    def reader(self) -> TorchBinReader:
        return TorchBinReader(self.path, self.files, {t.key: t for t in self.tensors})


class TorchBinReader:
    """Reads tensors from memory-mapped .bin files, mapping only the files that hold them.
    Runs on: each rank, for its own tensors."""

    def __init__(self, path: Path, files: dict[str, str], meta: dict[str, TensorMeta]) -> None:
        self.path = path
        self.files = files
        self.meta = meta
        self.mapped: tuple[str, dict] | None = None  # the last file mapped: consecutive read batches reuse it

    def _map(self, file: str) -> dict:
        if self.mapped is None or self.mapped[0] != file:
            self.mapped = None
            self.mapped = (file, load_weights(self.path / file, "cpu", mmap=True))
        return self.mapped[1]

    def read(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """Fetch `keys` (stored dtype, CPU), checked against the description."""
        by_file: dict[str, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.files[key], []).append(key)
        out: dict[str, torch.Tensor] = {}
        for file, group in by_file.items():
            loaded = self._map(file)
            for key in group:
                tensor, meta = loaded.get(key), self.meta[key]
                if not isinstance(tensor, torch.Tensor) or (tensor.dtype, tuple(tensor.shape)) != (
                    meta.dtype,
                    meta.shape,
                ):
                    raise SourceError(
                        f"{key!r} changed since the checkpoint was opened", where=self.path / file, hint="run again"
                    )
                out[key] = tensor
        return out

    def row_cuts(self, key: str) -> None:
        """None: the file is memory-mapped, so any rows are read exactly."""
        return None

    def read_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of `key`: a view of the mapped file (only their pages are touched)."""
        tensor = self.read([key])[key]
        return tensor[start:stop] if tensor.dim() else tensor


TORCH_BIN_FORMAT = SourceFormat(
    "pytorch-bin", "Hugging Face model dir (pytorch_model.bin)", is_torch_bin_dir, TorchBinSource, fallback=True
)
