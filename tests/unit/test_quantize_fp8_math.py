"""The fp8 recipes' own e4m3 math gives torchao's bytes: data and scales bit for bit those of torchao's
Float8Tensor.from_hp (KernelPreference.TORCH) on the same weight, whatever the dtype, in one piece or many; and a
rank running them imports neither torchao nor compressed-tensors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from distfinalize.transform.quant import fp8
from distfinalize.transform.quant.base import SCALE_FLOOR
from distfinalize.transform.quant.recipes import RECIPES

pytest.importorskip("torchao", reason="the reference is torchao's Float8Tensor")


def torchao_fp8(weight: torch.Tensor, tile: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """torchao's Float8Tensor.from_hp on the float32 weight: the reference the recipes match."""
    from torchao.quantization.granularity import PerBlock, PerRow
    from torchao.quantization.quantize_.common import KernelPreference
    from torchao.quantization.quantize_.workflows.float8.float8_tensor import Float8Tensor

    granularity = PerRow() if tile[0] == 1 else PerBlock(list(tile))
    t = Float8Tensor.from_hp(
        weight.float(), granularity=granularity, kernel_preference=KernelPreference.TORCH, hp_value_lb=SCALE_FLOOR
    )
    return t.qdata, t.scale.float().reshape(weight.shape[0] // tile[0], weight.shape[1] // tile[1])


def awkward(shape: tuple[int, int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random rows at very different magnitudes, an all-zero row, a row of tiny values (scale near the floor),
    rows holding the dtype's largest and smallest values."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.logspace(-6, 3, shape[0]).unsqueeze(1)
    w = w.to(dtype)
    w[1] = 0
    w[2] = torch.finfo(dtype).tiny * torch.arange(shape[1])
    w[3, :4] = torch.tensor([torch.finfo(dtype).max, -torch.finfo(dtype).max, 1.0, -0.0])
    w[4, 0] = -1e-3  # a row whose amax is a negative value
    return w


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("tile", [(1, 384), (128, 128)])
@pytest.mark.parametrize("piece", [fp8.SUB_BLOCK_BYTES, 128 * 384 * 4, 3 * 384 * 4])
def test_the_bytes_are_torchaos(
    dtype: torch.dtype, tile: tuple[int, int], piece: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fp8, "SUB_BLOCK_BYTES", piece)
    w = awkward((512, 384), dtype, seed=int(piece) % 97)
    data, scale = fp8.quantize_fp8(w, tile)
    ref_data, ref_scale = torchao_fp8(w, tile)
    assert data.dtype == ref_data.dtype == torch.float8_e4m3fn and data.shape == ref_data.shape
    assert torch.equal(data.view(torch.uint8), ref_data.view(torch.uint8))
    assert torch.equal(scale.view(torch.int32), ref_scale.view(torch.int32))


@pytest.mark.parametrize("recipe", ["fp8", "fp8-block"])
def test_the_recipes_quantize_through_it(recipe: str) -> None:
    w = awkward((256, 256), torch.bfloat16, seed=5)
    out = RECIPES[recipe].quantize("m.weight", w, torch.bfloat16)
    tile = (1, 256) if recipe == "fp8" else (128, 128)
    ref_data, ref_scale = torchao_fp8(w, tile)
    scale = out["m.weight_scale" if recipe == "fp8" else "m.weight_scale_inv"]
    assert torch.equal(out["m.weight"].view(torch.uint8), ref_data.view(torch.uint8))
    assert torch.equal(scale.reshape(ref_scale.shape), ref_scale)


def test_a_ragged_fp8_block_weight_is_torchaos_on_the_padded_weight() -> None:
    w = awkward((200, 300), torch.bfloat16, seed=6)
    out = RECIPES["fp8-block"].quantize("m.weight", w, torch.bfloat16)
    ref_data, ref_scale = torchao_fp8(torch.nn.functional.pad(w, (0, 84, 0, 56)), (128, 128))
    assert torch.equal(out["m.weight"].view(torch.uint8), ref_data[:200, :300].contiguous().view(torch.uint8))
    assert torch.equal(out["m.weight_scale_inv"], ref_scale)


def test_a_rank_quantizing_fp8_imports_neither_torchao_nor_compressed_tensors() -> None:
    code = (
        "import sys, torch\n"
        "from distfinalize.transform.quant.recipes import RECIPES\n"
        "for name in ('fp8', 'fp8-block'):\n"
        "    r = RECIPES[name]\n"
        "    r.quantize('m.weight', torch.randn(256, 256, dtype=torch.bfloat16), torch.bfloat16)\n"
        "    r.config_block(['lm_head'])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torchao', 'compressed_tensors')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]", done.stdout
