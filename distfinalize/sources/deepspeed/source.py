"""DeepSpeed ZeRO 1/2/3 input: a tag folder (global_stepN) of *_model_states.pt and *_optim_states.pt files.

Every model tensor is described by where its elements lie in the files, worked out from metadata alone:
the pickles are loaded with `torch.load(map_location="meta", weights_only=True)`, which reads no tensor
data but records each storage's byte offset in its file. A reader then rebuilds a parameter from the fp32 master
partitions with positioned reads of just its elements, so a rank touches only the bytes of the tensors it
writes and never holds a partition, let alone the whole model.

Where the elements are (the layout `deepspeed.utils.zero_to_fp32` reconstructs):
- ZeRO 1/2: per param group, the ranks' `single_partition_of_fp32_groups` concatenated in rank order form the
  group's flat vector (saved without the trailing padding); parameters follow each other in `param_shapes`
  order, each followed by its `param_alignment_paddings` entry.
- ZeRO 3: every parameter is split over all ranks: ceil(numel / world) elements at the same offset of each
  rank's `fp32_flat_groups` (concatenated over groups); the last rank's part ends in padding.
- Frozen parameters: `frozen_param_fragments` of the model states (whole tensors for ZeRO 1/2, each rank's
  padded partition for ZeRO 3). Buffers: the model states' module dict. Shared parameters: `shared_params`.

DeepSpeed itself is not needed to read a checkpoint: the classes its pickles name (loss scaler, stage enum,
fragment addresses) are replaced by inert stand-ins. Its checkpoint constants are used when it is installed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path

import torch

from distfinalize.errors import SourceError
from distfinalize.sources import SourceFormat, SourceInfo, TensorMeta
from distfinalize.sources.deepspeed.checks import (
    CORRUPT_HINT,
    _check_field,
    _check_model_states,
    _check_optim_fields,
    _check_world,
    _is_named,
    _partitions_of,
    _stage,
)
from distfinalize.sources.deepspeed.files import TagFiles, is_deepspeed_checkpoint, tag_files
from distfinalize.sources.deepspeed.layout import (
    Piece,
    TensorLayout,
    zero3_fragment_layout,
    zero3_layouts,
    zero12_layouts,
)
from distfinalize.sources.deepspeed.meta import (
    DS_CONFIG_KEY,
    GLOBAL_STEPS_KEY,
    MODULE_KEY,
    SHARED_PARAMS_KEY,
    as_flat,
    constants,
    load_meta,
    stored_layout,
)
from distfinalize.sources.fileread import read_exact

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- layouts


# ------------------------------------------------------------------------------------------------ the files


# ------------------------------------------------------------------------------------------------ the source


class DeepSpeedSource:
    """A DeepSpeed ZeRO tag folder, described from its pickles' metadata. Runs on: all ranks."""

    def __init__(self, path: Path, step: int | None = None) -> None:
        self.path = path
        self.files: dict[Path, int] = {}  # every file a tensor is read from -> its number in the pieces
        found = tag_files(path)
        model = load_meta(found.model_states[0])
        _check_model_states(model, found.model_states[0])
        optim = [_optimizer_state(p) for p in found.optim_states]
        self.stage = _stage(optim[0], found.optim_states[0])
        for state, optim_path in zip(optim, found.optim_states, strict=True):
            _check_optim_fields(state, optim_path, self.stage, len(model[constants().PARAM_SHAPES]))
        _check_world(optim[0], found, self.stage)
        try:
            layouts = self._layouts(model, optim, found)
        except ValueError as exc:
            raise SourceError(
                f"the ZeRO-{self.stage} partitions do not match the parameter shapes ({exc})",
                where=path,
                hint="the tag folder mixes files of different saves, or was written by an unsupported DeepSpeed",
            ) from exc
        if not layouts:
            raise SourceError("the DeepSpeed checkpoint holds no model tensors", where=path)
        self.layouts = _model_order(layouts, model)
        self.tensors = tuple(TensorMeta(n, n, lay.shape, lay.dtype) for n, lay in self.layouts.items())
        world = len(found.optim_states)
        masters = sum(len(_partitions_of(o, self.stage)) for o in optim)
        self.info = SourceInfo(
            format="deepspeed",
            path=path,
            step=step if step is not None else model.get(GLOBAL_STEPS_KEY),
            saved_world_size=world,
            skipped=sum(_count_tensors(o) for o in optim) - masters,  # optimizer moments, step counters, ...
            training_dtype=_training_dtype(model),
        )
        log.debug(
            "DeepSpeed ZeRO-%d checkpoint (deepspeed %s) saved by %d rank(s): %d tensors, training dtype %s",
            self.stage,
            model.get(constants().DS_VERSION),
            world,
            len(self.tensors),
            self.info.training_dtype,
        )

    def reader(self) -> DeepSpeedTensorReader:
        return DeepSpeedTensorReader(self.path, tuple(self.files), self.layouts)

    def _file(self, path: Path) -> int:
        return self.files.setdefault(path, len(self.files))

    def _layouts(self, model: dict, optim: list[dict], found: TagFiles) -> dict[str, TensorLayout]:
        """Buffers, frozen parameters, trainable parameters (fp32 masters), then shared aliases."""
        c = constants()
        model_path = found.model_states[0]
        model_file = self._file(model_path)
        layouts = {
            name: stored_layout(model[MODULE_KEY][name], model_file, model_path)
            for name in model.get(c.BUFFER_NAMES) or []
            if isinstance(model[MODULE_KEY].get(name), torch.Tensor)
        }
        frozen = model.get(c.FROZEN_PARAM_SHAPES) or {}
        partitions = [
            [
                as_flat(t, self._file(p), p, f"flat partition {g}")
                for g, t in enumerate(_partitions_of(o, self.stage, p))
            ]
            for o, p in zip(optim, found.optim_states, strict=True)
        ]
        dtypes = {f.dtype for flats in partitions for f in flats}
        if len(dtypes) != 1:
            raise SourceError(
                f"the fp32 master partitions mix dtypes {sorted(map(str, dtypes))}",
                where=self.path,
                hint=f"the tag folder mixes files of different saves; {CORRUPT_HINT}",
            )
        if self.stage <= 2:
            fragments = model.get(c.FROZEN_PARAM_FRAGMENTS) or {}
            layouts.update({n: self._frozen12(n, s, fragments, model_file, model_path) for n, s in frozen.items()})
            paddings = optim[0].get(c.PARAM_ALIGNMENT_PADDINGS)
            layouts.update(zero12_layouts(model[c.PARAM_SHAPES], partitions, paddings))
        else:
            if frozen:
                layouts.update(self._frozen3(frozen, found.model_states))
            shapes = {n: s for group in model[c.PARAM_SHAPES] for n, s in group.items()}
            layouts.update(zero3_layouts(shapes, partitions))
        for alias, target in (model.get(SHARED_PARAMS_KEY) or {}).items():
            if target in layouts and alias not in layouts:
                layouts[alias] = layouts[target]
        if self.stage <= 2:
            layouts.update(self._untracked12(model, layouts, model_file, model_path))
        return layouts

    def _frozen12(self, name: str, shape: Sequence[int], fragments: Mapping, file: int, path: Path) -> TensorLayout:
        """A ZeRO 1/2 frozen parameter: saved whole in the model states file."""
        tensor = fragments.get(name)
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(shape):
            raise SourceError(f"frozen parameter {name!r} has no fragment of shape {list(shape)}", where=path)
        return stored_layout(tensor, file, path)

    def _frozen3(self, shapes: Mapping[str, Sequence[int]], paths: Sequence[Path]) -> dict[str, TensorLayout]:
        """ZeRO-3 frozen parameters: every rank's model states file holds its padded part."""
        c = constants()
        per_rank = []
        for p in paths:
            states = load_meta(p)
            _check_field(states, c.FROZEN_PARAM_FRAGMENTS, p, "a dict of tensors by name", _is_named, optional=True)
            per_rank.append(states.get(c.FROZEN_PARAM_FRAGMENTS) or {})
        layouts = {}
        for name, shape in shapes.items():
            fragments = [
                as_flat(frags.get(name), self._file(p), p, f"frozen fragment {name!r}")
                for frags, p in zip(per_rank, paths, strict=True)
            ]
            layouts[name] = zero3_fragment_layout(shape, fragments)
        return layouts

    def _untracked12(self, model: dict, layouts: Mapping, file: int, path: Path) -> dict[str, TensorLayout]:
        """ZeRO 1/2 parameters the optimizer does not own and no frozen record lists: the module's own copy.

        DeepSpeed records frozen parameters only when it partitions gradients (ZeRO 2), so a ZeRO-1 checkpoint's
        frozen parameters exist only in the module state dict (whole, in the training dtype) and zero_to_fp32
        leaves them out. Untrained, that copy is exact.
        """
        found = {
            name: stored_layout(tensor, file, path)
            for name, tensor in model[MODULE_KEY].items()
            if name not in layouts and isinstance(tensor, torch.Tensor)
        }
        if found:
            log.info(
                "%d parameter(s) outside the optimizer and the frozen-parameter record (e.g. %s): taken from the "
                "module weights saved with the checkpoint",
                len(found),
                next(iter(found)),
            )
        return found


def _optimizer_state(path: Path) -> dict:
    c = constants()
    state = load_meta(path).get(c.OPTIMIZER_STATE_DICT)
    if not isinstance(state, dict):
        raise SourceError(f"no {c.OPTIMIZER_STATE_DICT!r} in the optimizer states file", where=path)
    return state


def _model_order(layouts: Mapping[str, TensorLayout], model: dict) -> dict[str, TensorLayout]:
    """The module's own state-dict order, then anything it does not list."""
    ordered = {n: layouts[n] for n in model.get(MODULE_KEY, {}) if n in layouts}
    return {**ordered, **{n: lay for n, lay in layouts.items() if n not in ordered}}


def _training_dtype(model: dict) -> torch.dtype | None:
    """bf16/fp16 from the DeepSpeed config saved with the model, else the module's floating parameter dtype."""
    config = model.get(DS_CONFIG_KEY)
    if isinstance(config, dict):
        for key, dtype in (("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("fp16", torch.float16)):
            section = config.get(key)
            if isinstance(section, dict) and section.get("enabled") is True:
                return dtype
    buffers = set(model.get(constants().BUFFER_NAMES) or [])
    dtypes = {
        t.dtype
        for n, t in (model.get(MODULE_KEY) or {}).items()
        if isinstance(t, torch.Tensor) and t.dtype.is_floating_point and n not in buffers
    }
    return dtypes.pop() if len(dtypes) == 1 else None


def _count_tensors(obj: object) -> int:
    if isinstance(obj, torch.Tensor):
        return 1
    if isinstance(obj, dict):
        return sum(_count_tensors(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_count_tensors(v) for v in obj)
    return 0


# ------------------------------------------------------------------------------------------------ the reader


class DeepSpeedTensorReader:
    """Rebuilds whole tensors with positioned reads of just their elements. Runs on: each rank."""

    def __init__(self, path: Path, files: tuple[Path, ...], layouts: Mapping[str, TensorLayout]) -> None:
        self.path = path
        self.files = files
        self.layouts = layouts

    def read(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """Fetch `keys` (stored dtype, CPU). Files are opened for this call only."""
        out: dict[str, torch.Tensor] = {}
        with ExitStack() as stack:
            handles: dict[int, object] = {}
            for key in keys:
                layout = self.layouts[key]
                try:
                    out[key] = self._read(layout, handles, stack)
                except OSError as exc:
                    raise SourceError(
                        f"cannot read tensor {key!r}",
                        where=self.path,
                        hint=f"the checkpoint files may be truncated or unreadable ({exc})",
                    ) from exc
        return out

    def row_cuts(self, key: str) -> None:
        """None: any block of rows is read exactly (see `read_rows`)."""
        return None

    def read_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of `key` (stored dtype, CPU): positioned reads of just their elements."""
        layout = self.layouts[key]
        if layout.stride is not None or not layout.shape:
            return self.read([key])[key][start:stop]
        row = math.prod(layout.shape[1:])
        part = TensorLayout(
            (stop - start, *layout.shape[1:]), layout.dtype, _element_range(layout, start * row, stop * row)
        )
        with ExitStack() as stack:
            try:
                return self._read(part, {}, stack)
            except OSError as exc:
                raise SourceError(
                    f"cannot read tensor {key!r}",
                    where=self.path,
                    hint=f"the checkpoint files may be truncated or unreadable ({exc})",
                ) from exc

    def _read(self, layout: TensorLayout, handles: dict, stack: ExitStack) -> torch.Tensor:
        flat = torch.empty(sum(p.numel for p in layout.pieces), dtype=layout.dtype)
        buffer = memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")
        itemsize, position = layout.dtype.itemsize, 0
        for piece in layout.pieces:
            if piece.file not in handles:
                handles[piece.file] = stack.enter_context(open(self.files[piece.file], "rb", buffering=0))  # noqa: SIM115
            size = piece.numel * itemsize
            read_exact(handles[piece.file], piece.offset, buffer[position : position + size], self.files[piece.file])
            position += size
        if layout.stride is not None:
            return flat.as_strided(layout.shape, layout.stride).clone()
        return flat.view(layout.shape)


def _element_range(layout: TensorLayout, start: int, stop: int) -> tuple[Piece, ...]:
    """The pieces of elements [start, stop) of a contiguous layout (its pieces concatenated). Pure."""
    pieces, base, itemsize = [], 0, layout.dtype.itemsize
    for piece in layout.pieces:
        lo, hi = max(start, base), min(stop, base + piece.numel)
        if lo < hi:
            pieces.append(Piece(piece.file, piece.offset + (lo - base) * itemsize, hi - lo))
        base += piece.numel
        if base >= stop:
            break
    return tuple(pieces)


DEEPSPEED_FORMAT = SourceFormat("deepspeed", "DeepSpeed", is_deepspeed_checkpoint, DeepSpeedSource)
