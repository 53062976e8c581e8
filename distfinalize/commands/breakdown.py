"""inspect's byte breakdowns: model / optimizer / other bytes of a checkpoint, from its metadata alone."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from distfinalize.plan import Plan

KINDS = ("model", "optimizer", "other")


@dataclass
class Tally:
    """Stored entries of one kind: tensor count and bytes (per dtype), and non-tensor entries."""

    tensors: int = 0
    bytes: int = 0
    objects: int = 0
    by_dtype: dict[str, int] = field(default_factory=dict)

    def add(self, dtype: torch.dtype | str, nbytes: int) -> None:
        name = str(dtype).removeprefix("torch.")
        self.tensors += 1
        self.bytes += nbytes
        self.by_dtype[name] = self.by_dtype.get(name, 0) + nbytes

    def as_dict(self) -> dict[str, Any]:
        return {
            "tensors": self.tensors,
            "bytes": self.bytes,
            "objects": self.objects,
            "by_dtype": dict(sorted(self.by_dtype.items())),
        }


@dataclass(frozen=True)
class Breakdown:
    """What a checkpoint stores, by kind, and the format's own detail (e.g. the ZeRO stage)."""

    tallies: Mapping[str, Tally]
    detail: str | None = None


def _tallies() -> dict[str, Tally]:
    return {kind: Tally() for kind in KINDS}


def dcp_breakdown(path: Path) -> Breakdown:
    """Model / optimizer / other bytes of a DCP checkpoint from its `.metadata` (and optimizer_0/ beside it)."""
    from distfinalize.commit.keep import OPTIMIZER_CONTAINERS, optimizer_source
    from distfinalize.sources.dcp import MODEL_CONTAINERS, model_tensors, read_metadata

    metadata = read_metadata(path)
    tallies = _tallies()
    model_keys = {t.key for t in model_tensors(metadata)[0]}
    paths = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}

    def kind_of(key: str) -> str:
        nested = paths.get(key)
        head = nested[0] if isinstance(nested, tuple) and nested else key.split(".", 1)[0]
        if key in model_keys:
            return "model"
        if head in OPTIMIZER_CONTAINERS:
            return "optimizer"
        return "model" if head in MODEL_CONTAINERS else "other"

    tally_dcp(metadata, kind_of, tallies)
    _, optimizer_md, separate = optimizer_source(path, metadata)
    if separate:
        tally_dcp(optimizer_md, lambda key: "optimizer", tallies)
    return Breakdown(tallies)


def tally_dcp(metadata: Any, kind_of: Callable[[str], str], tallies: Mapping[str, Tally]) -> None:
    """Add every entry of DCP metadata to the tally of its kind; tensors are sized from their metadata."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    for key, entry in metadata.state_dict_metadata.items():
        kind = kind_of(key)
        if isinstance(entry, TensorStorageMetadata):
            dtype = entry.properties.dtype
            tallies[kind].add(dtype, torch.Size(entry.size).numel() * dtype.itemsize)
        else:
            tallies[kind].objects += 1


def deepspeed_breakdown(path: Path) -> Breakdown:
    """Model / optimizer / other bytes of a DeepSpeed tag folder, from its pickles loaded on the meta device."""
    from distfinalize.sources.deepspeed.files import tag_files
    from distfinalize.sources.deepspeed.meta import constants, load_meta
    from distfinalize.sources.deepspeed.source import DeepSpeedSource

    source = DeepSpeedSource(path)
    files = tag_files(path)
    c = constants()
    tallies = _tallies()
    for t in source.tensors:
        tallies["model"].add(t.dtype, t.nbytes)
    for file in files.optim_states:
        state = load_meta(file)
        optim = state.get(c.OPTIMIZER_STATE_DICT) or {}
        masters = {
            id(t) for key in (c.SINGLE_PARTITION_OF_FP32_GROUPS, c.FP32_FLAT_GROUPS) for t in optim.get(key) or []
        }
        for tensor in _tensors_in(state):
            if id(tensor) not in masters:
                tallies["optimizer"].add(tensor.dtype, tensor.numel() * tensor.dtype.itemsize)
    for file in files.model_states:
        for tensor in _tensors_in(load_meta(file)):
            tallies["other"].add(tensor.dtype, tensor.numel() * tensor.dtype.itemsize)
    return Breakdown(tallies, f"ZeRO stage {source.stage}")


def _tensors_in(obj: object) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors_in(v)]
    if isinstance(obj, list | tuple):
        return [t for v in obj for t in _tensors_in(v)]
    return []


BREAKDOWNS: dict[str, Callable[[Path], Breakdown]] = {"dcp": dcp_breakdown, "deepspeed": deepspeed_breakdown}


def plan_breakdown(plan: Plan) -> Breakdown:
    """For formats without a breakdown: the model tensors the plan reads, as stored."""
    tallies = _tallies()
    for t in plan.tensors:
        tallies["model"].add(t.source_dtype, t.source_nbytes)
    return Breakdown(tallies)
