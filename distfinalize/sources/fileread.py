"""Positioned reads inside torch.save files: where a meta-loaded tensor's bytes lie, and reading exactly them.
Used by the readers of DeepSpeed and per-rank files. Runs on: each rank, for its own tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch

from distfinalize.errors import SourceError


def stored_offset(tensor: torch.Tensor, path: Path) -> int:
    """Byte offset in its file of a meta-loaded tensor's first element."""
    base = getattr(tensor.untyped_storage(), "_checkpoint_offset", None)
    if base is None:
        raise SourceError(
            "this torch does not report where tensors lie in checkpoint files",
            where=path,
            hint=f"torch {torch.__version__} lacks meta-load storage offsets; upgrade torch",
        )
    return base + tensor.storage_offset() * tensor.dtype.itemsize


def read_exact(handle, offset: int, into: memoryview, path: Path) -> None:
    """Fill `into` from `offset` of an open file; a short file is an OSError naming it."""
    handle.seek(offset)
    done = 0
    while done < len(into):
        n = handle.readinto(into[done:])
        if not n:
            raise OSError(f"{path.name} ends {len(into) - done} bytes early (at byte {offset + done})")
        done += n
