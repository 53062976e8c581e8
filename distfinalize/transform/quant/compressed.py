"""The compressed-tensors and transformers-fp8 recipes: fp8, fp8-block, int8, int4."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from distfinalize.errors import MissingDependencyError
from distfinalize.transform.quant.base import (
    BLOCK,
    FP8,
    FP8_REL_ERR,
    FP8_SUBNORMAL_HALF_STEP,
    INSTALL_HINT,
    SCALE_FLOOR,
    OutputSpec,
    Recipe,
    _torchao,
)
from distfinalize.transform.quant.fp8 import quantize_fp8


@dataclass(frozen=True)
class Fp8Channel(Recipe):
    """compressed-tensors float-quantized: e4m3 weight [N,K], float32 weight_scale [N,1], dynamic per-token acts."""

    def specs(self, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> tuple[OutputSpec, ...]:
        n, k = shape
        return (OutputSpec("weight", (n, k), FP8), OutputSpec("weight_scale", (n, 1), torch.float32))

    row_group = 1  # one scale per row
    scale_output = "weight_scale"

    def supports(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == 2 and shape[0] % 16 == 0 and shape[1] % 16 == 0  # FP8 GEMMs need multiples of 16

    def _quantize_rows(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        data, scale = quantize_fp8(weight, (1, weight.shape[1]))
        return {"weight": data, "weight_scale": scale}

    def _dequantize(self, local: dict[str, torch.Tensor]) -> torch.Tensor:
        return local["weight"].float() * local["weight_scale"]  # torchao's _dequantize_affine_float8

    def _error_bound(self, weight: torch.Tensor, local: dict[str, torch.Tensor]) -> torch.Tensor:
        scale = local["weight_scale"]
        return torch.maximum(weight.float().abs() * FP8_REL_ERR, scale * FP8_SUBNORMAL_HALF_STEP)

    def config_block(self, ignored: list[str]) -> dict[str, Any]:
        acts = _ct_args("float", 8, "token", dynamic=True)
        return _ct_block(self.format, weights=_ct_args("float", 8, "channel"), acts=acts, ignored=ignored)


@dataclass(frozen=True)
class Fp8Block(Recipe):
    """transformers fp8: e4m3 weight [N,K], float32 weight_scale_inv [ceil(N/128), ceil(K/128)], 128x128 tiles."""

    def specs(self, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> tuple[OutputSpec, ...]:
        n, k = shape
        grid = (math.ceil(n / BLOCK), math.ceil(k / BLOCK))
        return (OutputSpec("weight", (n, k), FP8), OutputSpec("weight_scale_inv", grid, torch.float32))

    def supports(self, shape: tuple[int, ...]) -> bool:
        # quantize() handles ragged edge tiles (the format allows them); transformers' CPU dequantize does not.
        return len(shape) == 2 and shape[0] % BLOCK == 0 and shape[1] % BLOCK == 0

    row_group = BLOCK  # one scale per 128x128 tile
    scale_output = "weight_scale_inv"

    def _quantize_rows(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        n, k = weight.shape
        pad_n, pad_k = -n % BLOCK, -k % BLOCK
        if not pad_n and not pad_k:
            data, scale = quantize_fp8(weight, (BLOCK, BLOCK))
            return {"weight": data, "weight_scale_inv": scale}
        data, scale = quantize_fp8(torch.nn.functional.pad(weight, (0, pad_k, 0, pad_n)), (BLOCK, BLOCK))
        return {"weight": data[:n, :k].contiguous(), "weight_scale_inv": scale}

    def _dequantize(self, local: dict[str, torch.Tensor]) -> torch.Tensor:
        data = local["weight"]
        scale = _expand_blocks(local["weight_scale_inv"], data.shape)
        return data.float() * scale

    def _error_bound(self, weight: torch.Tensor, local: dict[str, torch.Tensor]) -> torch.Tensor:
        scale = _expand_blocks(local["weight_scale_inv"], weight.shape)
        return torch.maximum(weight.float().abs() * FP8_REL_ERR, scale * FP8_SUBNORMAL_HALF_STEP)

    def config_block(self, ignored: list[str]) -> dict[str, Any]:
        # transformers reads modules_to_not_convert; vLLM's Fp8Config reads ignored_layers
        return {
            "quant_method": "fp8",
            "activation_scheme": "dynamic",
            "weight_block_size": [BLOCK, BLOCK],
            "modules_to_not_convert": list(ignored),
            "ignored_layers": list(ignored),
        }


def _expand_blocks(scale: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    n, k = shape
    return scale.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:n, :k]


@dataclass(frozen=True)
class PackedInt(Recipe):
    """compressed-tensors pack-quantized, symmetric: int32 weight_packed, float32 weight_scale, int64 weight_shape."""

    num_bits: int = 8
    group_size: int | None = None  # None: one scale per output channel

    @property
    def _qrange(self) -> tuple[int, int]:
        return -(1 << (self.num_bits - 1)), (1 << (self.num_bits - 1)) - 1

    def _group(self, k: int) -> int:
        return k if self.group_size is None else self.group_size

    def specs(self, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> tuple[OutputSpec, ...]:
        n, k = shape
        return (
            OutputSpec("weight_packed", (n, math.ceil(k * self.num_bits / 32)), torch.int32),
            OutputSpec("weight_scale", (n, math.ceil(k / self._group(k))), torch.float32),
            OutputSpec("weight_shape", (2,), torch.int64),
        )

    def supports(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == 2 and shape[1] % self._group(shape[1]) == 0

    row_group = 1  # scales per row (per channel, or per group of 128 within the row)

    def _quantize_rows(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        q, scale = self.int_values(weight)
        return {"weight_packed": _packer().pack_to_int32(q, self.num_bits), "weight_scale": scale}

    def _whole(self, shape: tuple[int, ...], device: torch.device) -> dict[str, torch.Tensor]:
        return {"weight_shape": torch.tensor(shape, dtype=torch.int64, device=device)}

    def int_values(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """torchao choose_qparams_affine + quantize_affine -> (int8 values in [qmin, qmax], float32 scale)."""
        primitives = _torchao()
        n, k = weight.shape
        if k % self._group(k):
            raise ValueError(f"{self.name}: in_features {k} is not a multiple of the group size {self.group_size}")
        block = (1, self._group(k))
        qmin, qmax = self._qrange
        hp = weight.float()  # scale = amax / ((qmax - qmin) / 2), computed in float32
        scale, zero = primitives.choose_qparams_affine(
            hp,
            primitives.MappingType.SYMMETRIC,
            block,
            torch.int8,
            qmin,
            qmax,
            eps=SCALE_FLOOR,
            scale_dtype=torch.float32,
            zero_point_dtype=torch.int8,
            keepdim=True,
        )
        q = primitives.quantize_affine(hp, block, scale, zero, torch.int8, qmin, qmax)
        return q, scale.reshape(n, -1)

    def _dequantize(self, local: dict[str, torch.Tensor]) -> torch.Tensor:
        shape = torch.Size(local["weight_shape"].tolist())
        q = _packer().unpack_from_int32(local["weight_packed"], self.num_bits, shape)
        qmin, qmax = self._qrange
        block = (1, self._group(shape[1]))
        return _torchao().dequantize_affine(
            q, block, local["weight_scale"], None, torch.int8, qmin, qmax, output_dtype=torch.float32
        )

    def _error_bound(self, weight: torch.Tensor, local: dict[str, torch.Tensor]) -> torch.Tensor:
        k = weight.shape[1]
        half_step = local["weight_scale"].float().repeat_interleave(self._group(k), 1) / 2
        return half_step + weight.float().abs() * 2.0**-20  # round-to-nearest, plus float32 rounding of x * (1/s)

    def config_block(self, ignored: list[str]) -> dict[str, Any]:
        strategy = "channel" if self.group_size is None else "group"
        weights = _ct_args("int", self.num_bits, strategy, group_size=self.group_size)
        return _ct_block(self.format, weights=weights, acts=None, ignored=ignored)


def _ct_args(kind: str, bits: int, strategy: str, dynamic: bool = False, group_size: int | None = None) -> dict:
    """compressed-tensors QuantizationArgs, symmetric, as the library serializes them."""
    return {
        "num_bits": bits,
        "type": kind,
        "symmetric": True,
        "group_size": group_size,
        "strategy": strategy,
        "dynamic": dynamic,
    }


def _ct_block(fmt: str, *, weights: dict[str, Any], acts: dict[str, Any] | None, ignored: list[str]) -> dict:
    """A compressed-tensors quantization_config, exactly as the library writes it (``QuantizationConfig
    .model_validate(...).model_dump(mode="json")``, every field filled in; tests/unit/test_quantize.py checks each
    recipe's block against the library's). Built here because importing compressed_tensors takes seconds on
    rank 0 (it loads transformers' quantizers and torchao)."""
    group = {"targets": ["Linear"], "weights": weights, "input_activations": acts, "output_activations": None}
    return {
        "config_groups": {"group_0": {**group, "format": fmt}},
        "quant_method": "compressed-tensors",
        "kv_cache_scheme": None,
        "format": fmt,
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "ignore": list(ignored),
        "moe_sparsity_config": None,
    }


def _packer() -> Any:
    """compressed-tensors' int32 packing helpers (the int recipes)."""
    try:
        from compressed_tensors.compressors.pack_quantized import helpers
    except ImportError as exc:
        raise MissingDependencyError("this recipe needs compressed-tensors", hint=INSTALL_HINT) from exc
    return helpers
