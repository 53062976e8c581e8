"""torchao's own safetensors format: the recipes torchao-int8, torchao-fp8, torchao-int4.

A quantized weight ``<module>.weight`` is a torchao tensor subclass, written the way
``torchao.prototype.safetensors.flatten_tensor_state_dict`` flattens it: one plain tensor per subclass field,
named ``<module>._weight_<field>`` (e.g. ``_weight_qdata``, ``_weight_scale``, ``_weight_zero_point``), plus a
JSON description of the subclass in the file header's ``__metadata__`` under the weight's name, and
``tensor_names`` listing every tensor of the model. transformers' loader (TorchAoHfQuantizer.set_metadata)
merges the headers of all shards with dict.update, so the last file's ``tensor_names`` wins: every file carries
the metadata of the whole model, as transformers' own save_pretrained writes it. ``quantization_config`` is
``transformers.TorchAoConfig(<torchao config>).to_dict()``.

The subclasses and their JSON come from torchao itself: the plan runs the recipe on a meta tensor of each shape
(no data, cached), the writing rank on the real weight, on its device. The weight is first cast to the model's
dtype, as quantize_ on a loaded model would see it; the subclass records that dtype.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from distfinalize.errors import MissingDependencyError
from distfinalize.transform.quant.base import (
    BLOCK,
    FP8_REL_ERR,
    FP8_SUBNORMAL_HALF_STEP,
    INSTALL_HINT,
    SCALE_FLOOR,
    OutputSpec,
    Recipe,
)

PREFIX = "_weight_"  # flatten_tensor_state_dict names a field f"{module}._{param}_{field}"
PLAIN = json.dumps({"_type": "Tensor"})  # what flatten_tensor_state_dict records for a plain tensor
CAST_REL_ERR = 2.0**-8  # a cast to the model dtype first: bf16 (the coarsest) rounds within 2^-8 of |x|
FLOAT32_REL_ERR = 2.0**-20  # float32 rounding in x / s, with margin


def _torchao_quantization() -> Any:
    try:
        import torchao.quantization as tq
    except ImportError as exc:
        raise MissingDependencyError("the torchao-* recipes need torchao", hint=INSTALL_HINT) from exc
    return tq


@dataclass(frozen=True)
class TorchAoRecipe(Recipe):
    """A torchao config, its tensor subclass flattened into safetensors with torchao's metadata."""

    casts_first = True

    def config(self) -> Any:
        """The torchao config (an AOBaseConfig) this recipe applies. Runs on: any rank."""
        raise NotImplementedError

    def subclass(self, weight: torch.Tensor) -> torch.Tensor:
        """The torchao tensor subclass for `weight` (any device, meta included): the config's quantize_ handler."""
        tq = _torchao_quantization()
        n, k = weight.shape
        linear = torch.nn.Linear(k, n, bias=False, device="meta")
        linear.weight = torch.nn.Parameter(weight, requires_grad=False)
        tq.quantize_(linear, self.config())
        return linear.weight

    def flatten(self, name: str, weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], str]:
        """torchao's flatten of one quantized weight: (its plain tensors by output name, its metadata JSON)."""
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

        data, metadata = flatten_tensor_state_dict({name: self.subclass(weight)})
        return data, metadata[name]

    def specs(self, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> tuple[OutputSpec, ...]:
        return _layout(self, tuple(shape), _needs_dtype(self, dtype))[0]

    def supports(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == 2

    def _quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        data, _ = self.flatten("x.weight", weight)
        return {k.removeprefix("x."): v for k, v in data.items()}

    def _dequantize(self, local: dict[str, torch.Tensor]) -> torch.Tensor:
        """Unflatten with torchao (metadata regenerated for float32) and take the subclass's own dequantize()."""
        from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

        qdata = local[f"{PREFIX}qdata"]  # the three subclasses keep qdata in the weight's shape
        _, metadata = _layout(self, tuple(qdata.shape), torch.float32)
        data = {f"x.{k}": v for k, v in local.items()}
        restored, left = unflatten_tensor_state_dict(data, {"x.weight": metadata, "tensor_names": '["x.weight"]'})
        if left:
            raise ValueError(f"{self.name}: tensors torchao does not expect: {sorted(left)}")
        return restored["x.weight"].dequantize().float()

    def config_block(self, ignored: list[str]) -> dict[str, Any]:
        from transformers import TorchAoConfig

        block = TorchAoConfig(self.config(), modules_to_not_convert=list(ignored)).to_dict()
        return json.loads(json.dumps(block))  # plain JSON types (quant_method is a str enum)

    def file_metadata(self, tensors: Sequence[tuple[str, tuple[int, ...], torch.dtype, bool]]) -> dict[str, str]:
        """flatten_tensor_state_dict's metadata for the whole model: each weight's JSON and `tensor_names`.

        `tensors`: (name, shape, dtype, quantized) of every tensor the model writes, in order. Pure (meta tensors).
        """
        out = {
            name: _layout(self, tuple(shape), dtype)[1] if quantized else PLAIN
            for name, shape, dtype, quantized in tensors
        }
        out["tensor_names"] = json.dumps([name for name, *_ in tensors])
        return out

    def _cast_bound(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.float().abs() * CAST_REL_ERR if weight.dtype != torch.bfloat16 else torch.zeros(())

    def _scale(self, local: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
        scale = local[f"{PREFIX}scale"].float()
        return scale.repeat_interleave(shape[1] // scale.shape[1], 1)


@functools.lru_cache(maxsize=4096)
def _layout(recipe: TorchAoRecipe, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[tuple[OutputSpec, ...], str]:
    """(output specs, metadata JSON) of a weight of this shape and dtype, from torchao run on a meta tensor."""
    data, metadata = recipe.flatten("x.weight", torch.empty(shape, dtype=dtype, device="meta"))
    specs = tuple(OutputSpec(k.removeprefix("x."), tuple(v.shape), v.dtype) for k, v in data.items())
    return specs, metadata


def _needs_dtype(recipe: Recipe, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is None:
        raise ValueError(f"{recipe.name}: the output dtype of the weight is needed (torchao records it)")
    return dtype


@dataclass(frozen=True)
class TorchAoInt(TorchAoRecipe):
    """Int8WeightOnlyConfig / IntxWeightOnlyConfig: symmetric integers (zero_point 0), scale per row or group."""

    num_bits: int = 8
    group_size: int | None = None  # None: one scale per output channel

    def config(self) -> Any:
        tq = _torchao_quantization()
        if self.num_bits == 8 and self.group_size is None:
            return tq.Int8WeightOnlyConfig()
        dtype = getattr(torch, f"int{self.num_bits}")
        return tq.IntxWeightOnlyConfig(weight_dtype=dtype, granularity=tq.PerGroup(self.group_size))

    def supports(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == 2 and (self.group_size is None or shape[1] % self.group_size == 0)

    def _error_bound(self, weight: torch.Tensor, local: dict[str, torch.Tensor]) -> torch.Tensor:
        # round-to-nearest: half a step; with a bf16 scale (Intx on a bf16 model) the scale's own rounding and x / s
        # in bf16 move values by up to 2^-7 of |x| (measured 0.536 steps at |x| = 8 steps, i.e. 2^-7.8 of |x|)
        scale = self._scale(local, weight.shape)
        rel = FLOAT32_REL_ERR if local[f"{PREFIX}scale"].dtype == torch.float32 else 2 * CAST_REL_ERR
        return scale / 2 + weight.float().abs() * rel + self._cast_bound(weight)


@dataclass(frozen=True)
class TorchAoFloat8(TorchAoRecipe):
    """Float8WeightOnlyConfig: Float8Tensor, e4m3 per row, float32 scales."""

    def config(self) -> Any:
        return _torchao_quantization().Float8WeightOnlyConfig()

    def subclass(self, weight: torch.Tensor) -> torch.Tensor:
        """Float8WeightOnlyConfig's Float8Tensor.from_hp call, plus an amax floor: without it torchao 0.18 turns
        an all-zero row into NaN (scale 0). The floor is not part of the metadata; the tests compare with quantize_."""
        from torchao.quantization.quantize_.workflows.float8.float8_tensor import Float8Tensor

        config = self.config()
        return Float8Tensor.from_hp(
            weight, float8_dtype=config.weight_dtype, granularity=config.granularity, hp_value_lb=SCALE_FLOOR
        )

    def supports(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == 2 and shape[0] % 16 == 0 and shape[1] % 16 == 0  # FP8 GEMMs need multiples of 16

    def _error_bound(self, weight: torch.Tensor, local: dict[str, torch.Tensor]) -> torch.Tensor:
        scale = self._scale(local, weight.shape)
        fp8 = torch.maximum(weight.float().abs() * FP8_REL_ERR, scale * FP8_SUBNORMAL_HALF_STEP)
        return fp8 * (1 + CAST_REL_ERR) + self._cast_bound(weight)


TORCHAO_RECIPES: tuple[Recipe, ...] = (
    TorchAoInt(
        "torchao-int8",
        "W8A16: torchao Int8WeightOnlyConfig (Int8Tensor, per-channel), torchao's safetensors format",
        "torchao",
        "tq.Int8WeightOnlyConfig()",
        num_bits=8,
    ),
    TorchAoFloat8(
        "torchao-fp8",
        "FP8 e4m3 weights per channel: torchao Float8WeightOnlyConfig (Float8Tensor), torchao's safetensors format",
        "torchao",
        "tq.Float8WeightOnlyConfig()",
    ),
    TorchAoInt(
        "torchao-int4",
        "W4A16: torchao IntxWeightOnlyConfig(int4, group 128) (IntxUnpackedToInt8Tensor: int4 values stored one "
        "per int8), torchao's safetensors format",
        "torchao",
        "tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=tq.PerGroup(128))",
        num_bits=4,
        group_size=BLOCK,
    ),
)
