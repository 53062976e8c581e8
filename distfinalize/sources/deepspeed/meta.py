"""DeepSpeed pickles read safely: tensors without data that know their byte offsets, foreign classes replaced by
inert stand-ins.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import pickle
import zipfile
from contextlib import ExitStack
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import torch

from distfinalize.errors import SourceError
from distfinalize.sources.deepspeed.layout import (
    Flat,
    Piece,
    TensorLayout,
)
from distfinalize.sources.fileread import stored_offset

log = logging.getLogger(__name__)


# deepspeed.checkpoint.constants, for when DeepSpeed is not installed (tests check they match).
FALLBACK_CONSTANTS = {
    "OPTIMIZER_STATE_DICT": "optimizer_state_dict",
    "SINGLE_PARTITION_OF_FP32_GROUPS": "single_partition_of_fp32_groups",
    "FP32_FLAT_GROUPS": "fp32_flat_groups",
    "ZERO_STAGE": "zero_stage",
    "PARTITION_COUNT": "partition_count",
    "PARAM_ALIGNMENT_PADDINGS": "param_alignment_paddings",
    "PARAM_SHAPES": "param_shapes",
    "BUFFER_NAMES": "buffer_names",
    "FROZEN_PARAM_SHAPES": "frozen_param_shapes",
    "FROZEN_PARAM_FRAGMENTS": "frozen_param_fragments",
    "DS_VERSION": "ds_version",
    "CHECKPOINT_PARALLEL_DIMS": "checkpoint_parallel_dimensions",
    "CHECKPOINT_PP_DEGREE": "pp_degree",
    "CHECKPOINT_TP_DEGREE": "tp_degree",
    "AUTOEP_LAYERS_KEY": "ds_autoep_layers",
    "AUTOEP_LAYERS_KEY_LEGACY": "autoep_layers",
    "MODEL_FILE_PREFIX": "mp_rank_",
    "ZERO_FILE_PREFIX": "zero_pp_rank_",
    "OPTIM_FILE_SUFFIX": "_optim_states.pt",
    "MODEL_FILE_SUFFIX": "_model_states.pt",
    "LAYER_FILE_PREFIX": "layer_",
}


# Keys DeepSpeed writes that deepspeed.checkpoint.constants has no name for.
MODULE_KEY = "module"
SHARED_PARAMS_KEY = "shared_params"
DS_CONFIG_KEY = "ds_config"
MP_WORLD_SIZE_KEY = "mp_world_size"
GLOBAL_STEPS_KEY = "global_steps"


@cache
def constants() -> SimpleNamespace:
    """DeepSpeed's checkpoint constants: from `deepspeed/checkpoint/constants.py` when DeepSpeed is installed.

    The file is loaded on its own (it imports nothing): `import deepspeed` would set up an accelerator on
    every rank just to name a few dict keys.
    """
    values = dict(FALLBACK_CONSTANTS)
    try:
        spec = importlib.util.find_spec("deepspeed")
        origin = Path(spec.origin).parent / "checkpoint" / "constants.py" if spec and spec.origin else None
        if origin is not None and origin.is_file():
            module_spec = importlib.util.spec_from_file_location("_distfinalize_deepspeed_constants", origin)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
            values.update({k: getattr(module, k) for k in FALLBACK_CONSTANTS if hasattr(module, k)})
    except Exception as exc:  # a broken optional install must not stop reading: the fallback values are exact
        log.debug("deepspeed's checkpoint constants are unavailable (%s); using distfinalize's copy", exc)
    return SimpleNamespace(**values)


class _Opaque:
    """Stands in for a class a DeepSpeed pickle names (LossScaler, ZeroStageEnum, ...): keeps data, runs no code."""

    def __new__(cls, *args: object, **kwargs: object) -> _Opaque:
        return super().__new__(cls)

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.args = args

    def __setstate__(self, state: object) -> None:
        self.state = state


@cache
def meta_load_records_offsets() -> bool:
    """Whether torch.load(map_location="meta") skips the data and records offsets (newer torch); else the
    same is done under a FakeTensorMode (slower to set up, but there for longer)."""
    buffer = io.BytesIO()
    torch.save(torch.zeros(1), buffer)
    buffer.seek(0)
    tensor = torch.load(buffer, map_location="meta", weights_only=True)
    return getattr(tensor.untyped_storage(), "_checkpoint_offset", None) is not None


def load_meta(path: Path) -> dict:
    """Unpickle a checkpoint file into tensors without data that know their offset in the file, safely.

    `weights_only=True`, with every non-torch class the pickle names replaced by `_Opaque`.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        with ExitStack() as stack:
            stack.enter_context(torch.serialization.safe_globals([(_Opaque, name) for name in unsafe]))
            if not meta_load_records_offsets():
                stack.enter_context(FakeTensorMode())
            data = torch.load(str(path), map_location="meta", weights_only=True)
    except OSError as exc:
        raise SourceError("cannot read DeepSpeed checkpoint file", where=path, hint=str(exc)) from exc
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile, KeyError) as exc:
        raise SourceError(
            "not a readable torch.save file",
            where=path,
            hint=f"the checkpoint may be truncated; pick another tag with --tag ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})",
        ) from exc
    if not isinstance(data, dict):
        raise SourceError("not a DeepSpeed checkpoint file (no dict inside)", where=path)
    return data


def as_flat(tensor: object, file: int, path: Path, what: str) -> Flat:
    """A stored 1-D contiguous tensor as a Flat."""
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 1 or (tensor.numel() > 1 and tensor.stride(0) != 1):
        raise SourceError(f"{what} is not a flat tensor", where=path, hint="the checkpoint layout is not ZeRO's")
    return Flat(file, stored_offset(tensor, path), tensor.numel(), tensor.dtype)


def stored_layout(tensor: torch.Tensor, file: int, path: Path) -> TensorLayout:
    """A whole tensor stored in a file (a buffer, a ZeRO 1/2 frozen parameter), possibly as a strided view."""
    shape, offset = tuple(tensor.shape), stored_offset(tensor, path)
    if tensor.is_contiguous():
        return TensorLayout(shape, tensor.dtype, (Piece(file, offset, tensor.numel()),))
    span = 1 + sum((n - 1) * s for n, s in zip(shape, tensor.stride(), strict=True)) if tensor.numel() else 0
    return TensorLayout(shape, tensor.dtype, (Piece(file, offset, span),), tuple(tensor.stride()))
