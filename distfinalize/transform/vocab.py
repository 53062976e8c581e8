"""Vocabulary resize of embedding rows, done in the tensor pipeline by the rank that writes the tensor.

New rows are initialised like transformers' `resize_token_embeddings(mean_resizing=True)` (the mean of
the old rows) unless the token asks for `zero` or a `copy` of another token's row. Rows that existed keep
their bytes, so logits over the old vocabulary do not change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from distfinalize.sources import TensorMeta

INIT_KINDS = ("zero", "mean", "copy")


@dataclass(frozen=True)
class RowInit:
    """How one row is initialised: zero, mean of the old rows, or a copy of `source_row`."""

    row: int
    kind: str
    source_row: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in INIT_KINDS:
            raise ValueError(f"row init {self.kind!r} is not one of {', '.join(INIT_KINDS)}")
        if (self.kind == "copy") != (self.source_row is not None):
            raise ValueError("a copy init needs a source row, and only a copy init has one")


@dataclass(frozen=True)
class RowResize:
    """Grow dim 0 of an embedding matrix to `rows`; rows not listed in `inits` beyond the old ones get the mean."""

    rows: int
    inits: tuple[RowInit, ...] = ()


def resize_rows(tensor: torch.Tensor, resize: RowResize) -> torch.Tensor:
    """The resized matrix, in the tensor's dtype; the mean is taken in float32. Runs on: the owning rank."""
    old = tensor.shape[0]
    if resize.rows < old:
        raise ValueError(f"cannot shrink {old} rows to {resize.rows}")
    mean = tensor.float().mean(dim=0).to(tensor.dtype)
    out = torch.empty((resize.rows, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    out[:old] = tensor
    out[old:] = mean
    for init in resize.inits:
        if init.kind == "zero":
            out[init.row] = 0
        elif init.kind == "mean":
            out[init.row] = mean
        else:
            out[init.row] = tensor[init.source_row]
    return out


def plan_resizes(
    tensors: Sequence[TensorMeta],
    embedding_names: Sequence[str],
    tokenizer_length: int,
    row_inits: Sequence[RowInit],
    multiple: int | None,
) -> dict[str, RowResize]:
    """Which embedding matrices grow, to how many rows, and how new token rows start. Pure.

    Rows = max(rows in the checkpoint, tokenizer length), rounded up to `multiple`. Rows are never removed:
    a checkpoint may carry more rows than the tokenizer has tokens (padded vocabularies).
    """
    by_name = {t.name: t for t in tensors}
    targets = [by_name[n] for n in dict.fromkeys(embedding_names) if n in by_name]
    if not targets:
        return {}
    old = targets[0].shape[0]
    rows = max(old, tokenizer_length)
    if multiple:
        rows = -(-rows // multiple) * multiple
    if rows == old and not row_inits:
        return {}
    resize = RowResize(rows, tuple(row_inits))
    return {t.name: resize for t in targets if t.shape[0] == old}
