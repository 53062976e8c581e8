"""Round-to-nearest weight quantization, written as plain safetensors tensors that transformers and vLLM read.

Each recipe in RECIPES names its torchao config, its on-disk format and its config.json block. The math runs on
the tensor's own device (GPU when the rank has one): the int and torchao-* recipes through torchao's primitives,
packed with compressed-tensors' own packer; the fp8 recipes through fp8.py, torchao's arithmetic bit for bit
without its import. Everything here works on one tensor at a time, so a rank quantizes what it writes and
nothing else.

Output names: a quantized weight ``<module>.weight`` becomes ``f"{module}.{suffix}"`` for each OutputSpec of
its recipe, e.g. ``model.layers.0.mlp.down_proj.weight_scale``. All scales are float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from distfinalize.errors import MissingDependencyError, SourceError

INSTALL_HINT = "pip install 'distfinalize[quant]'  (torchao and compressed-tensors)"
BLOCK = 128  # fp8-block tile and int4 group size
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
FP8_REL_ERR = 2.0**-4  # e4m3 has 3 mantissa bits: round-to-nearest is within 2^-4 of |x| for normals
FP8_SUBNORMAL_HALF_STEP = 2.0**-10  # half the e4m3 subnormal spacing (2^-9), in units of the scale
SCALE_FLOOR = 1e-12  # amax floor so an all-zero row or block gets a finite scale
ROW_BLOCK_BYTES = 16 * 2**20  # float32 bytes of the rows quantized at once: the bound on the math's temporaries
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
    # Rows that share scales (1: per row or per group within a row; 128: fp8-block tiles). 0: the recipe quantizes
    # the whole weight at once. Otherwise `_quantize_rows` runs on blocks of such rows (ROW_BLOCK_BYTES of float32
    # each), so the temporaries are bounded by a block, and the outputs are exactly those of the whole weight.
    row_group: ClassVar[int] = 0
    # The output that is non-finite exactly when the input holds a NaN or Inf (a scale computed from the amax,
    # which passes them through): checked after quantizing, instead of a pass over the weight before. "": none.
    scale_output: ClassVar[str] = ""

    def specs(self, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> tuple[OutputSpec, ...]:
        """The tensors written for a weight of this shape, written for a model of `dtype`. Pure."""
        raise NotImplementedError

    def supports(self, shape: tuple[int, ...]) -> bool:
        """Whether a weight of this shape divides as the recipe and its loaders need."""
        raise NotImplementedError

    def _quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every output of the whole weight. Recipes with a `row_group` implement `_quantize_rows` instead."""
        return {**self._quantize_rows(weight), **self._whole(tuple(weight.shape), weight.device)}

    def _quantize_rows(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """The outputs that follow the weight's rows (data, scales), for a block of whole row groups."""
        raise NotImplementedError

    def _whole(self, shape: tuple[int, ...], device: torch.device) -> dict[str, torch.Tensor]:
        """The outputs that describe the whole weight, not its rows (e.g. weight_shape). None by default."""
        return {}

    def block_rows(self, shape: tuple[int, ...]) -> int:
        """Rows quantized at once for a weight of `shape`: a multiple of `row_group` within ROW_BLOCK_BYTES (at
        least one group), or every row when the recipe has no row group. Pure."""
        n, k = shape
        if not self.row_group:
            return n
        return max(self.row_group, ROW_BLOCK_BYTES // (4 * max(k, 1)) // self.row_group * self.row_group)

    def _rows_in_blocks(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """`_quantize_rows` of these rows, computed `block_rows` rows at a time into preallocated outputs."""
        rows = self.block_rows(tuple(weight.shape))
        if rows >= weight.shape[0]:
            return self._quantize_rows(weight)
        out: dict[str, torch.Tensor] = {}
        filled: dict[str, int] = {}
        for start in range(0, weight.shape[0], rows):
            for key, part in self._quantize_rows(weight[start : start + rows]).items():
                if key not in out:
                    spec = next(s for s in self.specs(tuple(weight.shape)) if s.suffix == key)
                    out[key], filled[key] = torch.empty(spec.shape, dtype=part.dtype, device=part.device), 0
                out[key][filled[key] : filled[key] + part.shape[0]].copy_(part)
                filled[key] += part.shape[0]
        return out

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
        if not self.scale_output:
            check_finite(weight_name, weight, self.name)
        if not self.row_group:
            local = self._quantize(weight)
        else:
            local = {**self._rows_in_blocks(weight), **self._whole(tuple(weight.shape), weight.device)}
        self._check_scale(weight_name, weight, local)
        return {f"{module}.{k}": v for k, v in local.items()}

    @torch.no_grad()
    def quantize_rows(self, weight_name: str, rows: torch.Tensor, start: int, shape: tuple[int, ...]) -> dict:
        """The outputs for rows [start, start + len(rows)) of a weight of `shape` (whole row groups; a recipe with a
        `row_group`): the blocks of its row outputs, and with the first block the outputs that describe the whole
        weight. Together, exactly quantize()'s. Runs on: the rank that owns the tensor, block by block."""
        module = module_of(weight_name)
        _check_2d(weight_name, tuple(shape))
        if not self.scale_output:
            check_finite(weight_name, rows, self.name)
        local = self._rows_in_blocks(rows)
        self._check_scale(weight_name, rows, local)
        if start == 0:
            local.update(self._whole(tuple(shape), rows.device))
        return {f"{module}.{k}": v for k, v in local.items()}

    def _check_scale(self, weight_name: str, weight: torch.Tensor, local: dict[str, torch.Tensor]) -> None:
        """With a `scale_output`: when that scale is not all finite, count the weight's NaN and Inf and raise
        (check_finite)."""
        if self.scale_output and not bool(torch.isfinite(local[self.scale_output]).all()):
            check_finite(weight_name, weight, self.name)

    def dequantize(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The float32 weight that quantize()'s tensors stand for (for verify). Runs on: the rank that owns it."""
        return self._dequantize(_local(tensors))

    def error_bound(self, weight: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Elementwise bound on |dequantize(tensors) - weight| for round-to-nearest. Runs on: the owning rank."""
        return self._error_bound(weight, _local(tensors))


def nonfinite_count(weight: torch.Tensor) -> int:
    """How many elements of `weight` are NaN or +-Inf: isfinite().all() reductions on the tensor's device, a block
    of rows at a time (the mask's bytes bounded by ROW_BLOCK_BYTES), the count only when one fails. Runs on: the
    rank that holds the tensor."""
    if weight.dim() < 2:
        return 0 if bool(torch.isfinite(weight).all()) else int((~torch.isfinite(weight)).sum())
    rows = max(1, ROW_BLOCK_BYTES // max(1, weight[0].numel()))
    bad = 0
    for start in range(0, weight.shape[0], rows):
        block = weight[start : start + rows]
        if not bool(torch.isfinite(block).all()):
            bad += int((~torch.isfinite(block)).sum())
    return bad


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
