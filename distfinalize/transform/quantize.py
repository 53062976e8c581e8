"""Round-to-nearest weight quantization, written as plain safetensors tensors that transformers and vLLM read.

Each recipe in RECIPES names its torchao config, its on-disk format and its config.json block. The math runs
through torchao's primitives on the tensor's own device (GPU when the rank has one); the int recipes pack with
compressed-tensors' own packer. Everything here works on one tensor at a time, so a rank quantizes what it
writes and nothing else.

Output names: a quantized weight ``<module>.weight`` becomes ``f"{module}.{suffix}"`` for each OutputSpec of
its recipe, e.g. ``model.layers.0.mlp.down_proj.weight_scale``. All scales are float32.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from distfinalize.errors import DeviceError, MissingDependencyError, SourceError

INSTALL_HINT = "pip install 'distfinalize[quant]'  (torchao and compressed-tensors)"
BLOCK = 128  # fp8-block tile and int4 group size
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
FP8_REL_ERR = 2.0**-4  # e4m3 has 3 mantissa bits: round-to-nearest is within 2^-4 of |x| for normals
FP8_SUBNORMAL_HALF_STEP = 2.0**-10  # half the e4m3 subnormal spacing (2^-9), in units of the scale
SCALE_FLOOR = 1e-12  # amax floor so an all-zero row or block gets a finite scale
NONFINITE_FLAG = "--quantize-skip-nonfinite"

# Left unquantized by default: embeddings, lm_head, norms, MoE routers and gates (matched on the module name).
DEFAULT_IGNORE = (
    r"(^|\.)lm_head$",
    r"embed",
    r"(^|\.)(wte|wpe)$",
    r"norm",
    r"router",
    r"(^|\.)gate$",
    r"_gate$",
)


@dataclass(frozen=True)
class OutputSpec:
    """One tensor a recipe writes for a quantized weight: named ``f"{module}.{suffix}"``."""

    suffix: str  # local tensor name: "weight", "weight_scale", "weight_scale_inv", "weight_packed", "weight_shape"
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class Requirement:
    """What a recipe's math needs from the rank's device and the model dtype; checked once, up front."""

    cpu: bool = True  # the math runs on CPU
    min_cuda_capability: tuple[int, int] | None = None  # on CUDA: the oldest compute capability it runs on
    dtypes: tuple[torch.dtype, ...] = ()  # model dtypes it accepts; () for any
    needed_by: str = ""  # what needs it, for the error message

    def problem(self, device_type: str, capability: tuple[int, int] | None, dtype: torch.dtype | None) -> str | None:
        """Why a device of this type (and CUDA compute capability) or this model dtype cannot run the recipe;
        None when it can. Pure."""
        if device_type == "cpu" and not self.cpu:
            need = f" of compute capability {_capability(self.min_cuda_capability)} or newer"
            return f"needs a CUDA GPU{need if self.min_cuda_capability else ''}, and this rank runs on the CPU"
        minimum = self.min_cuda_capability
        if device_type == "cuda" and minimum is not None and (capability is None or tuple(capability) < minimum):
            have = _capability(capability) if capability is not None else "unknown"
            return f"needs a CUDA GPU of compute capability {_capability(minimum)} or newer; this rank's GPU has {have}"
        if self.dtypes and dtype is not None and dtype not in self.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            return f"needs {names} weights, and the output dtype is {str(dtype).removeprefix('torch.')}"
        return None


def _capability(capability: tuple[int, int] | None) -> str:
    return ".".join(map(str, capability)) if capability else "none"


def module_of(weight_name: str) -> str:
    """``a.b.weight`` -> ``a.b``; the names the config blocks' ignore lists use."""
    if not weight_name.endswith(".weight"):
        raise ValueError(f"not a weight name: {weight_name!r} (expected '<module>.weight')")
    return weight_name[: -len(".weight")]


@dataclass(frozen=True)
class Recipe:
    """A registry entry: how one 2-D Linear weight is quantized, stored and described in config.json."""

    name: str
    description: str
    format: str  # on-disk format, as the loader calls it
    torchao_config: str  # the torchao quantize_ config whose math this recipe runs, by name
    requires: Requirement = Requirement()

    casts_first: ClassVar[bool] = False  # quantize the weight cast to the model dtype (else from float32)

    def specs(self, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> tuple[OutputSpec, ...]:
        """The tensors written for a weight of this shape, written for a model of `dtype`. Pure."""
        raise NotImplementedError

    def supports(self, shape: tuple[int, ...]) -> bool:
        """Whether a weight of this shape divides as the recipe and its loaders need."""
        raise NotImplementedError

    def _quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _dequantize(self, local: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def _error_bound(self, weight: torch.Tensor, local: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def config_block(self, ignored: list[str]) -> dict[str, Any]:
        """The ``quantization_config`` for config.json; `ignored` are module names left unquantized."""
        raise NotImplementedError

    def stored_dtypes(self, dtype: torch.dtype | None = None) -> dict[str, torch.dtype]:
        """Suffix -> dtype of the tensors written for each quantized weight of a `dtype` model (the same for every
        shape). Pure."""
        return {s.suffix: s.dtype for s in self.specs((BLOCK, BLOCK), dtype)}

    def file_metadata(self, tensors: Sequence[tuple[str, tuple[int, ...], torch.dtype, bool]]) -> dict[str, str]:
        """Header ``__metadata__`` every output file carries, given (name, shape, dtype, quantized) of every
        tensor the model writes. None by default. Pure. Runs on: all ranks (the plan)."""
        return {}

    def outputs(
        self, weight_name: str, shape: tuple[int, ...], dtype: torch.dtype | None = None
    ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Output name -> (shape, dtype) for one weight, from metadata alone. Runs on: all ranks (the plan)."""
        module = module_of(weight_name)
        _check_2d(weight_name, shape)
        return {f"{module}.{s.suffix}": (s.shape, s.dtype) for s in self.specs(tuple(shape), dtype)}

    def output_bytes(self, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> int:
        """Bytes written for a weight of this shape (for the plan's file split). Pure."""
        return sum(math.prod(s.shape) * s.dtype.itemsize for s in self.specs(tuple(shape), dtype))

    @torch.no_grad()
    def quantize(
        self, weight_name: str, weight: torch.Tensor, dtype: torch.dtype | None = None
    ) -> dict[str, torch.Tensor]:
        """Quantize on the weight's device for a model of `dtype`; keys and shapes exactly those of outputs().

        Runs on: the rank that owns the tensor.
        """
        module = module_of(weight_name)
        _check_2d(weight_name, tuple(weight.shape))
        if self.casts_first and dtype is not None:
            weight = weight.to(dtype)
        check_finite(weight_name, weight, self.name)
        return {f"{module}.{k}": v for k, v in self._quantize(weight).items()}

    def dequantize(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The float32 weight that quantize()'s tensors stand for (for verify). Runs on: the rank that owns it."""
        return self._dequantize(_local(tensors))

    def error_bound(self, weight: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Elementwise bound on |dequantize(tensors) - weight| for round-to-nearest. Runs on: the owning rank."""
        return self._error_bound(weight, _local(tensors))


def nonfinite_count(weight: torch.Tensor) -> int:
    """How many elements of `weight` are NaN or +-Inf: one isfinite().all() reduction on the tensor's device, the
    count only when that fails. Runs on: the rank that holds the tensor."""
    if bool(torch.isfinite(weight).all()):
        return 0
    return int((~torch.isfinite(weight)).sum())


def check_finite(weight_name: str, weight: torch.Tensor, recipe: str) -> None:
    """Refuse to quantize a weight holding NaN or Inf (SourceError naming it and how many): its scale would be
    NaN and every value sharing that scale lost, silently. Runs on: the rank that writes the tensor."""
    bad = nonfinite_count(weight)
    if bad:
        raise SourceError(
            f"--quantize {recipe}: {bad} of {weight.numel()} values of {weight_name} are NaN or Inf",
            hint=f"{NONFINITE_FLAG} leaves such weights unquantized (in the model dtype, as stored); or fix the "
            "checkpoint",
        )


def _local(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name.rsplit(".", 1)[-1]: t for name, t in tensors.items()}


def _check_2d(name: str, shape: tuple[int, ...]) -> None:
    if len(shape) != 2:
        raise ValueError(f"{name}: only 2-D Linear weights are quantized, got shape {tuple(shape)}")


def _torchao() -> Any:
    try:
        import torchao.quantization.quant_primitives as primitives
    except ImportError as exc:
        raise MissingDependencyError("quantization needs torchao", hint=INSTALL_HINT) from exc
    return primitives


def _float8(weight: torch.Tensor, block: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """torchao Float8Tensor.from_hp (torch kernel, the same on CPU and GPU) -> (e4m3 data, float32 scale)."""
    _torchao()
    from torchao.quantization.granularity import PerBlock, PerRow
    from torchao.quantization.quantize_.common import KernelPreference
    from torchao.quantization.quantize_.workflows.float8.float8_tensor import Float8Tensor

    granularity = PerRow() if block[0] == 1 else PerBlock(block)
    # float32 in, so the scale is amax / 448 in float32 rather than in the weight's dtype
    t = Float8Tensor.from_hp(
        weight.float(), granularity=granularity, kernel_preference=KernelPreference.TORCH, hp_value_lb=SCALE_FLOOR
    )
    return t.qdata, t.scale.float()


@dataclass(frozen=True)
class Fp8Channel(Recipe):
    """compressed-tensors float-quantized: e4m3 weight [N,K], float32 weight_scale [N,1], dynamic per-token acts."""

    def specs(self, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> tuple[OutputSpec, ...]:
        n, k = shape
        return (OutputSpec("weight", (n, k), FP8), OutputSpec("weight_scale", (n, 1), torch.float32))

    def supports(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == 2 and shape[0] % 16 == 0 and shape[1] % 16 == 0  # FP8 GEMMs need multiples of 16

    def _quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        data, scale = _float8(weight, [1, weight.shape[1]])
        return {"weight": data, "weight_scale": scale.reshape(-1, 1)}

    def _dequantize(self, local: dict[str, torch.Tensor]) -> torch.Tensor:
        return _torchao()._dequantize_affine_float8(local["weight"], local["weight_scale"])

    def _error_bound(self, weight: torch.Tensor, local: dict[str, torch.Tensor]) -> torch.Tensor:
        scale = local["weight_scale"]
        return torch.maximum(weight.float().abs() * FP8_REL_ERR, scale * FP8_SUBNORMAL_HALF_STEP)

    def config_block(self, ignored: list[str]) -> dict[str, Any]:
        return _ct_block(self.format, weights=_ct_args("float", 8, "channel"), acts=_FP8_TOKEN_ACTS, ignored=ignored)


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

    def _quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        n, k = weight.shape
        pad_n, pad_k = -n % BLOCK, -k % BLOCK
        padded = torch.nn.functional.pad(weight, (0, pad_k, 0, pad_n)) if pad_n or pad_k else weight
        data, scale = _float8(padded, [BLOCK, BLOCK])
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

    def _quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

        q, scale = self.int_values(weight)
        return {
            "weight_packed": pack_to_int32(q, self.num_bits),
            "weight_scale": scale,
            "weight_shape": torch.tensor(weight.shape, dtype=torch.int64, device=weight.device),
        }

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
            hp, primitives.MappingType.SYMMETRIC, block, torch.int8, qmin, qmax, eps=SCALE_FLOOR,
            scale_dtype=torch.float32, zero_point_dtype=torch.int8, keepdim=True,
        )  # fmt: skip
        q = primitives.quantize_affine(hp, block, scale, zero, torch.int8, qmin, qmax)
        return q, scale.reshape(n, -1)

    def _dequantize(self, local: dict[str, torch.Tensor]) -> torch.Tensor:
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

        shape = torch.Size(local["weight_shape"].tolist())
        q = unpack_from_int32(local["weight_packed"], self.num_bits, shape)
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


def _ct_args(kind: str, bits: int, strategy: str, **extra: Any) -> dict[str, Any]:
    args = {"num_bits": bits, "type": kind, "strategy": strategy, "symmetric": True, "dynamic": False}
    return {**args, **{k: v for k, v in extra.items() if v is not None}}


_FP8_TOKEN_ACTS = {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True, "dynamic": True}


def _ct_block(fmt: str, *, weights: dict[str, Any], acts: dict[str, Any] | None, ignored: list[str]) -> dict:
    """A compressed-tensors quantization_config, validated and filled in by compressed_tensors itself."""
    try:
        from compressed_tensors.quantization import QuantizationConfig
    except ImportError as exc:
        raise MissingDependencyError("this recipe needs compressed-tensors", hint=INSTALL_HINT) from exc
    group = {"targets": ["Linear"], "weights": weights, "input_activations": acts, "format": fmt}
    config = QuantizationConfig.model_validate(
        {
            "quant_method": "compressed-tensors",
            "format": fmt,
            "quantization_status": "compressed",
            "config_groups": {"group_0": group},
            "ignore": list(ignored),
        }
    )
    return config.model_dump(mode="json")


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


def _register_torchao_recipes() -> None:
    from distfinalize.transform.torchao_format import TORCHAO_RECIPES  # imports Recipe from here

    RECIPES.update({r.name: r for r in TORCHAO_RECIPES})


_register_torchao_recipes()
DEFAULT_RECIPE = "fp8"


def check_requirement(recipe: Recipe, device: torch.device, dtype: torch.dtype | None, where: str) -> None:
    """Refuse up front a recipe the rank's device or the model dtype cannot run (DeviceError).

    Runs on: every rank, in the prepare step, before anything is written.
    """
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    problem = recipe.requires.problem(device.type, capability, dtype)
    if problem is None:
        return
    others = [r.name for r in RECIPES.values() if r.requires.problem(device.type, capability, dtype) is None]
    raise DeviceError(
        f"--quantize {recipe.name} {problem}",
        where=where,
        hint=f"{recipe.requires.needed_by + '; ' if recipe.requires.needed_by else ''}run it where that holds, "
        f"or choose a recipe this machine runs: {', '.join(others)}",
    )


def get_recipe(name: str) -> Recipe:
    """The registry entry for --quantize NAME; ValueError names the allowed ones."""
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown quantization recipe {name!r}; choose one of {', '.join(RECIPES)}") from None


def quantizable(
    name: str,
    shape: tuple[int, ...],
    spec_output_embedding: str | None,
    *,
    recipe: Recipe,
    spec_input_embedding: str | None = None,
    tied: Collection[str] = (),
    ignore: Sequence[str] = (),
) -> bool:
    """Whether the recipe quantizes this tensor (pure, from metadata). Runs on: all ranks (the plan).

    Left unquantized: anything not a 2-D ``.weight`` (biases, norms, 1-D tensors, fused 3-D experts); the input
    and output embeddings; every name in `tied` (aliases and what they alias: nothing tied is quantized); modules
    matching DEFAULT_IGNORE (lm_head, embed, norm, router, gate) or a user `ignore` regex (re.search on the module
    name); and shapes the recipe cannot divide (Recipe.supports).
    """
    if not name.endswith(".weight") or len(shape) != 2:
        return False
    if name in (spec_output_embedding, spec_input_embedding):
        return False
    if name in tied:
        return False
    module = module_of(name)
    if any(re.search(p, module) for p in (*DEFAULT_IGNORE, *ignore)):
        return False
    return recipe.supports(tuple(shape))


def ignored_modules(
    tensors: Iterable[tuple[str, tuple[int, ...]]],
    spec_output_embedding: str | None,
    *,
    recipe: Recipe,
    spec_input_embedding: str | None = None,
    tied: Collection[str] = (),
    ignore: Sequence[str] = (),
) -> list[str]:
    """Module names of the 2-D weights left unquantized: the list config_block() and the card record. Pure."""
    kwargs = {"recipe": recipe, "spec_input_embedding": spec_input_embedding, "tied": tied, "ignore": ignore}
    return [
        module_of(name)
        for name, shape in tensors
        if name.endswith(".weight")
        and len(shape) == 2
        and not quantizable(name, shape, spec_output_embedding, **kwargs)
    ]
