"""Rotary layout of q/k projections: interleaved (Meta/torchtitan) -> Hugging Face's half-split layout."""

from __future__ import annotations

import torch


def rope_to_hf(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Permute the rows of each head from interleaved pairs to two halves, as Hugging Face's Llama conversion
    script (`permute`) and torchtitan's state-dict adapter (`to_hf`) do. Runs on: the owning rank's device."""
    rows, cols = weight.shape
    if rows % (2 * heads):
        raise ValueError(f"cannot split {rows} rows into {heads} heads of rotary pairs")
    return weight.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)
