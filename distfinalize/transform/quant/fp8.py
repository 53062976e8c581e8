"""The e4m3 math of the fp8 and fp8-block recipes, in plain torch ops, a cache-sized piece of rows at a time.

The arithmetic is torchao's ``Float8Tensor.from_hp`` with ``KernelPreference.TORCH`` (the unit tests compare the
bytes with torchao's): per tile (a row, or a 128x128 block) the amax of |x|, floored at SCALE_FLOOR; the scale
amax / 448 in float32; the data x / scale in float32, clamped to +-448 and rounded to e4m3. It is written out
here so that a rank neither imports torchao (seconds of start-up and tens of MiB per process) nor makes five
weight-sized float32 temporaries: on the CPU the rows go through in pieces of SUB_BLOCK_BYTES of float32, so every
pass (|x| and its amax in the weight's dtype, which is exact; the float32 copy, divide and clamp; the rounding)
works in the core's cache, and the only full-size result is the e4m3 data. On a GPU a piece is the whole block.

A non-finite value gives a non-finite scale (NaN and Inf pass through the amax), so the recipes check the small
scale tensor instead of making a pass over the weight (base.Recipe.scale_output).
Runs on: the rank that owns the tensor, on its device.
"""

from __future__ import annotations

import torch

from distfinalize.transform.quant.base import FP8, FP8_MAX, SCALE_FLOOR

SUB_BLOCK_BYTES = 512 * 2**10  # float32 bytes of the rows one piece works on (within a core's L2 cache)
EXACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # |x| and amax exact; float32 division of x as is


def quantize_fp8(weight: torch.Tensor, tile: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 data [n, k], float32 scale [n / tile rows, k / tile cols]) of a weight whose shape the `tile`
    divides: one scale per tile. Bit for bit torchao's Float8Tensor.from_hp(weight.float(), PerRow() or
    PerBlock(tile), KernelPreference.TORCH, hp_value_lb=SCALE_FLOOR)."""
    n, k = weight.shape
    tile_rows, tile_cols = tile
    if n % tile_rows or k % tile_cols:
        raise ValueError(f"a {n}x{k} weight does not divide into {tile_rows}x{tile_cols} tiles")
    if weight.dtype not in EXACT_DTYPES:
        weight = weight.float()
    data = torch.empty((n, k), dtype=FP8, device=weight.device)
    scale = torch.empty((n // tile_rows, k // tile_cols), dtype=torch.float32, device=weight.device)
    step = piece_rows(weight, tile_rows)
    magnitude = torch.empty(min(step, n) * k, dtype=weight.dtype, device=weight.device)
    scaled = torch.empty(min(step, n) * k, dtype=torch.float32, device=weight.device)
    for start in range(0, n, step):
        rows = weight[start : start + step]
        count = rows.shape[0]
        tiles = (count // tile_rows, tile_rows, k // tile_cols, tile_cols)
        part = scale[start // tile_rows : (start + count) // tile_rows]
        amax = torch.abs(rows, out=magnitude[: count * k].view(count, k)).view(tiles).amax(dim=(1, 3))
        part.copy_(amax).clamp_(min=SCALE_FLOOR).div_(FP8_MAX)
        values = scaled[: count * k].view(count, k)
        values.copy_(rows)
        values.view(tiles).div_(part.view(tiles[0], 1, tiles[2], 1))
        values.clamp_(-FP8_MAX, FP8_MAX)
        data[start : start + count].copy_(values)
    return data, scale


def piece_rows(weight: torch.Tensor, tile_rows: int) -> int:
    """Rows per piece: whole tiles within SUB_BLOCK_BYTES of float32 on the CPU (at least one tile); every row on
    other devices, where each op is a kernel launch. Pure."""
    n, k = weight.shape
    if weight.device.type != "cpu":
        return max(n, 1)
    return max(tile_rows, SUB_BLOCK_BYTES // (4 * max(k, 1)) // tile_rows * tile_rows)
