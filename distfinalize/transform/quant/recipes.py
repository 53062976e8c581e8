"""The --quantize registry: every recipe by name."""

from __future__ import annotations

from distfinalize.transform.quant.base import BLOCK, Recipe
from distfinalize.transform.quant.compressed import Fp8Block, Fp8Channel, PackedInt

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Fp8Channel(
            "fp8",
            "FP8 e4m3 weights, per-output-channel scales, dynamic per-token FP8 activations (compressed-tensors)",
            "float-quantized",
            "tq.Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())",
        ),
        Fp8Block(
            "fp8-block",
            "FP8 e4m3 weights in 128x128 blocks, dynamic activations (transformers/DeepSeek fp8 format)",
            "fp8",
            "tq.Float8DynamicActivationFloat8WeightConfig(granularity=PerBlock([128, 128]))",
        ),
        PackedInt(
            "int8",
            "W8A16: int8 weights, symmetric, per-output-channel scales (compressed-tensors pack-quantized)",
            "pack-quantized",
            "tq.Int8WeightOnlyConfig()",
            num_bits=8,
        ),
        PackedInt(
            "int4",
            "W4A16: int4 weights, symmetric, groups of 128 (compressed-tensors pack-quantized)",
            "pack-quantized",
            "tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=tq.PerGroup(128))",
            num_bits=4,
            group_size=BLOCK,
        ),
    )
}


from distfinalize.transform.quant.torchao import TORCHAO_RECIPES  # noqa: E402  (it builds on base's Recipe)

RECIPES.update({r.name: r for r in TORCHAO_RECIPES})


DEFAULT_RECIPE = "fp8"


def get_recipe(name: str) -> Recipe:
    """The registry entry for --quantize NAME; ValueError names the allowed ones."""
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown quantization recipe {name!r}; choose one of {', '.join(RECIPES)}") from None
