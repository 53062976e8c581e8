"""Quantizing in row blocks gives exactly the outputs of the whole weight at once, with temporaries bounded."""

from __future__ import annotations

import pytest
import torch

from distfinalize.transform.quant import base
from distfinalize.transform.quant.recipes import RECIPES

pytest.importorskip("torchao", reason="the recipes' math is torchao's")
pytest.importorskip("compressed_tensors", reason="the int recipes pack with compressed-tensors")

BLOCKED = [name for name, recipe in RECIPES.items() if recipe.row_group]


def test_the_compressed_recipes_quantize_in_row_blocks() -> None:
    assert set(BLOCKED) == {"fp8", "fp8-block", "int8", "int4"}


@pytest.mark.parametrize("recipe", BLOCKED)
@pytest.mark.parametrize("shape", [(384, 256), (304, 256)])  # 304: a ragged last block (and fp8-block tile)
def test_row_blocks_are_bit_identical_to_the_whole_weight(
    recipe: str, shape: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    r = RECIPES[recipe]
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float32).to(torch.bfloat16)
    weight[5] = 0  # an all-zero row takes the scale floor
    whole = r.quantize("m.weight", weight, torch.bfloat16)
    monkeypatch.setattr(base, "ROW_BLOCK_BYTES", 128 * shape[1] * 4)  # 128 rows of float32 per block
    assert r.block_rows(shape) == 128 < shape[0]
    calls = []
    original = type(r)._quantize_rows
    monkeypatch.setattr(type(r), "_quantize_rows", lambda self, w: calls.append(w.shape[0]) or original(self, w))
    blocked = r.quantize("m.weight", weight, torch.bfloat16)
    assert calls == [128, 128, shape[0] - 256]  # never more than a block of rows at once
    assert whole.keys() == blocked.keys()
    for name in whole:
        assert whole[name].dtype == blocked[name].dtype and whole[name].shape == blocked[name].shape
        assert torch.equal(whole[name].view(torch.uint8), blocked[name].view(torch.uint8)), name


def test_nonfinite_values_are_counted_across_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base, "ROW_BLOCK_BYTES", 16 * 4)
    weight = torch.zeros(64, 16)
    weight[3, 2] = float("nan")
    weight[60, 0] = float("inf")
    assert base.nonfinite_count(weight) == 2
