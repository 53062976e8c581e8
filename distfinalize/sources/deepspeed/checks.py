"""A DeepSpeed tag folder's pickles checked before their layout is trusted: every field of the model and optimizer
states the reader uses, by type and size.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from distfinalize.errors import SourceError
from distfinalize.sources.deepspeed.files import TagFiles
from distfinalize.sources.deepspeed.meta import (
    GLOBAL_STEPS_KEY,
    MODULE_KEY,
    MP_WORLD_SIZE_KEY,
    SHARED_PARAMS_KEY,
    _Opaque,
    constants,
)


def _partitions_of(optim: dict, stage: int, path: Path | None = None) -> list:
    """The rank's fp32 master partitions, one per param group."""
    c = constants()
    key = c.SINGLE_PARTITION_OF_FP32_GROUPS if stage <= 2 else c.FP32_FLAT_GROUPS
    value = optim.get(key)
    if not isinstance(value, list) or not value:
        raise SourceError(f"no {key!r} in the optimizer states file", where=path, hint="not a ZeRO checkpoint")
    return value


def _check_model_states(model: dict, path: Path) -> None:
    """Refuse malformed fields, and tensor/pipeline-parallel and AutoEP layouts the file names did not reveal."""
    c = constants()
    for key in (MODULE_KEY, c.PARAM_SHAPES, c.BUFFER_NAMES):
        if model.get(key) is None:
            raise SourceError(f"no {key!r} in the model states file", where=path, hint="not a ZeRO checkpoint")
    _check_model_fields(model, path)
    dims = model.get(c.CHECKPOINT_PARALLEL_DIMS) or {}
    tp, pp = dims.get(c.CHECKPOINT_TP_DEGREE) or 1, dims.get(c.CHECKPOINT_PP_DEGREE) or 1
    mp = model.get(MP_WORLD_SIZE_KEY) or 1
    if tp > 1 or mp > 1:
        raise SourceError(
            f"tensor-parallel DeepSpeed checkpoint (tp_degree {tp}, mp_world_size {mp})",
            where=path,
            hint="distfinalize reads ZeRO data-parallel checkpoints; merge the tensor-parallel shards first",
        )
    if pp > 1:
        raise SourceError(
            f"pipeline-parallel DeepSpeed checkpoint (pp_degree {pp})",
            where=path,
            hint="distfinalize reads ZeRO data-parallel checkpoints; convert with DeepSpeed's ds_to_universal.py",
        )
    if model.get(c.AUTOEP_LAYERS_KEY) or model.get(c.AUTOEP_LAYERS_KEY_LEGACY):
        raise SourceError(
            "AutoEP (expert-parallel) DeepSpeed checkpoint",
            where=path,
            hint="expert-parallel checkpoints are not supported; convert with DeepSpeed's ds_to_universal.py",
        )


# The layout fields read from the pickles, checked before any is used: a wrong type or size is a SourceError that
# names the file and the field, never a TypeError from deep inside the layout arithmetic.
CORRUPT_HINT = "the file is corrupt or was not written by DeepSpeed ZeRO; pick another tag with --tag"


def _is_count(value: object, least: int = 0) -> bool:
    return type(value) is int and value >= least


def _is_shape(value: object) -> bool:
    return isinstance(value, list | tuple) and all(_is_count(n) for n in value)  # torch.Size is a tuple


def _is_shapes(value: object) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and _is_shape(v) for k, v in value.items())


def _is_named(value: object) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) for k in value)


def _check_field(
    state: dict, key: str, path: Path, expected: str, valid: Callable[[object], bool], optional: bool = False
) -> None:
    """SourceError naming the file and the field when `state[key]` is not `valid` (or None, when `optional`)."""
    value = state.get(key)
    if (optional and value is None) or valid(value):
        return
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    raise SourceError(
        f"malformed DeepSpeed checkpoint: {key!r} is {type(value).__name__} {shown}, expected {expected}",
        where=path,
        hint=CORRUPT_HINT,
    )


def _check_model_fields(model: dict, path: Path) -> None:
    """The model states fields the layout is worked out from. Runs on: all ranks."""
    c = constants()
    _check_field(model, MODULE_KEY, path, "a dict of tensors by name", _is_named)
    _check_field(
        model,
        c.PARAM_SHAPES,
        path,
        "a list of {name: shape} dicts, one per param group",
        lambda v: isinstance(v, list) and all(_is_shapes(group) for group in v),
    )
    _check_field(
        model,
        c.BUFFER_NAMES,
        path,
        "a list of names",
        lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v),
    )
    _check_field(model, c.FROZEN_PARAM_SHAPES, path, "a {name: shape} dict", _is_shapes, optional=True)
    _check_field(model, c.FROZEN_PARAM_FRAGMENTS, path, "a dict of tensors by name", _is_named, optional=True)
    _check_field(
        model,
        SHARED_PARAMS_KEY,
        path,
        "a {alias: name} dict",
        lambda v: _is_named(v) and all(isinstance(t, str) for t in v.values()),
        optional=True,
    )
    _check_field(
        model,
        c.CHECKPOINT_PARALLEL_DIMS,
        path,
        "a dict of parallel degrees",
        lambda v: (
            isinstance(v, dict)
            and all(
                v.get(k) is None or _is_count(v.get(k), 1) for k in (c.CHECKPOINT_TP_DEGREE, c.CHECKPOINT_PP_DEGREE)
            )
        ),
        optional=True,
    )
    _check_field(model, MP_WORLD_SIZE_KEY, path, "a positive int", lambda v: _is_count(v, 1), optional=True)
    _check_field(model, GLOBAL_STEPS_KEY, path, "a step number", _is_count, optional=True)


def _check_optim_fields(optim: dict, path: Path, stage: int, groups: int) -> None:
    """One rank's optimizer states fields: partition counts, its master partitions (one per param group for
    ZeRO 1/2, like param_shapes) and their alignment paddings. Runs on: all ranks."""
    c = constants()
    _check_field(
        optim,
        c.PARTITION_COUNT,
        path,
        "a positive int or a list of them",
        lambda v: _is_count(v, 1) or (isinstance(v, list) and bool(v) and all(_is_count(n, 1) for n in v)),
        optional=True,
    )
    if stage > 2:
        return
    partitions = len(_partitions_of(optim, stage, path))
    if partitions != groups:
        raise SourceError(
            f"malformed DeepSpeed checkpoint: {c.SINGLE_PARTITION_OF_FP32_GROUPS!r} holds {partitions} "
            f"partition(s) but the model states' {c.PARAM_SHAPES!r} has {groups} param group(s)",
            where=path,
            hint=CORRUPT_HINT,
        )
    _check_field(
        optim,
        c.PARAM_ALIGNMENT_PADDINGS,
        path,
        f"a list of {groups} lists of non-negative ints",
        lambda v: (
            isinstance(v, list)
            and len(v) == groups
            and all(isinstance(g, list) and all(_is_count(n) for n in g) for g in v)
        ),
        optional=True,
    )


def _check_world(optim: dict, found: TagFiles, stage: int) -> None:
    """As many optimizer states files as ranks saved (and model states files, for ZeRO 3)."""
    counts = optim.get(constants().PARTITION_COUNT)
    saved = max(counts) if isinstance(counts, list) and counts else counts
    world, folder = len(found.optim_states), found.optim_states[0].parent
    if isinstance(saved, int) and saved != world:
        raise SourceError(
            f"the checkpoint was saved by {saved} ranks but holds {world} *_optim_states.pt files",
            where=folder,
            hint="a save was overwritten or incomplete; pick another tag with --tag",
        )
    if stage == 3 and len(found.model_states) != world:
        raise SourceError(
            f"ZeRO-3 checkpoint with {world} optimizer states files but {len(found.model_states)} model states files",
            where=folder,
            hint="a save was overwritten or incomplete; pick another tag with --tag",
        )


def _stage(optim: dict, path: Path) -> int:
    c = constants()
    raw = optim.get(c.ZERO_STAGE)
    if isinstance(raw, _Opaque):  # ZeroStageEnum(stage), unpickled without DeepSpeed
        raw = raw.args[0] if getattr(raw, "args", None) else None
    try:
        stage = int(getattr(raw, "value", raw))
    except (TypeError, ValueError):
        stage = None
    if stage not in (1, 2, 3):
        raise SourceError(
            f"unsupported ZeRO stage {raw!r}",
            where=path,
            hint="distfinalize reads ZeRO stage 1, 2 and 3 checkpoints",
        )
    return stage
