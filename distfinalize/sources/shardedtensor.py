"""FSDP1's ShardedTensor (torch.distributed._shard), read from a torch.save file without a process group.

torch's own ShardedTensor refuses to unpickle without the process group that saved it, and its pickle names
`builtins.getattr` (to reach its nested ProcessGroupState class). So the classes it names are replaced by inert
stand-ins that only keep the pickled state (SUBSTITUTES), and `builtins.getattr` by a function that answers
`ShardedTensor.ProcessGroupState` (with a stand-in) and nothing else. No other class is admitted: the
weights_only unpickler refuses the rest. Runs on: any rank.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass

import torch

SHARDED_TENSOR = "torch.distributed._shard.sharded_tensor.api.ShardedTensor"
RECORDS = (
    "torch.distributed._shard.sharded_tensor.shard.Shard",
    "torch.distributed._shard.metadata.ShardMetadata",
    "torch.distributed._shard.sharded_tensor.metadata.ShardedTensorMetadata",
    "torch.distributed._shard.sharded_tensor.metadata.TensorProperties",
    "torch.distributed._shard.sharding_spec.chunk_sharding_spec.ChunkShardingSpec",
    "torch.distributed.remote_device._remote_device",
)
ENUM = "torch.distributed._shard.sharded_tensor.metadata.MEM_FORMAT_ENCODING"


class ShardedTensorRecord(torch.Tensor):
    """Stands in for a ShardedTensor: a tensor without data of its global shape and dtype, plus the pickled state
    (local shards, metadata of every shard, process-group state)."""

    state: tuple = ()

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise TypeError(f"{func} on a ShardedTensor read without its process group")

    def __setstate__(self, state: object) -> None:
        self.state = state if isinstance(state, tuple) else ()


class Record:
    """Stands in for one of ShardedTensor's metadata classes: keeps what was pickled, runs no code."""

    args: tuple = ()
    state: object = None

    def __new__(cls, *args: object, **kwargs: object) -> Record:
        return super().__new__(cls)

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.args = args

    def __setstate__(self, state: object) -> None:
        self.state = state

    def field(self, name: str) -> object:
        """A pickled attribute: from a dict state, or a slotted dataclass's (None, {slot: value})."""
        if isinstance(self.state, dict):
            return self.state.get(name)
        if isinstance(self.state, tuple) and len(self.state) == 2 and isinstance(self.state[1], dict):
            return self.state[1].get(name)
        return None


def nested_class(owner: object, name: object) -> type[Record]:
    """Replaces `builtins.getattr` while unpickling: only `ShardedTensor.ProcessGroupState` is answered."""
    if owner is ShardedTensorRecord and name == "ProcessGroupState":
        return Record
    raise pickle.UnpicklingError(f"getattr({getattr(owner, '__name__', owner)!r}, {name!r}) is not allowed")


SUBSTITUTES = [
    (ShardedTensorRecord, SHARDED_TENSOR),
    *((Record, name) for name in (*RECORDS, ENUM)),
    (nested_class, "builtins.getattr"),
]


@dataclass(frozen=True)
class ShardInfo:
    """One shard of a ShardedTensor: the saving rank, where it sits in the tensor."""

    rank: int
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


def shards_of(value: ShardedTensorRecord) -> list[ShardInfo] | None:
    """Every shard's rank, offsets and sizes, from the ShardedTensor's metadata; None when it is not readable."""
    state = value.state
    metadata = state[1] if len(state) > 1 else None
    listed = metadata.field("shards_metadata") if isinstance(metadata, Record) else None
    if not isinstance(listed, list):
        return None
    out = []
    for shard in listed:
        if not isinstance(shard, Record):
            return None
        offsets, sizes, placement = (shard.field(n) for n in ("shard_offsets", "shard_sizes", "placement"))
        rank = placement.field("_rank") if isinstance(placement, Record) else None
        if not (isinstance(offsets, list) and isinstance(sizes, list) and isinstance(rank, int)):
            return None
        out.append(ShardInfo(rank, tuple(int(o) for o in offsets), tuple(int(s) for s in sizes)))
    return out


def local_tensors(value: ShardedTensorRecord) -> list[tuple[tuple[int, ...], torch.Tensor]]:
    """(offsets, tensor) of the shards this file holds."""
    state = value.state
    local = state[0] if state else None
    out = []
    for shard in local if isinstance(local, list) else []:
        tensor = shard.field("tensor") if isinstance(shard, Record) else None
        metadata = shard.field("metadata") if isinstance(shard, Record) else None
        offsets = metadata.field("shard_offsets") if isinstance(metadata, Record) else None
        if isinstance(tensor, torch.Tensor) and isinstance(offsets, list):
            out.append((tuple(int(o) for o in offsets), tensor))
    return out


def saved_world_size(value: ShardedTensorRecord) -> int | None:
    """The world size of the process group that saved it (its pickled ProcessGroupState)."""
    return _group_field(value, "global_world_size")


def saving_rank(value: ShardedTensorRecord) -> int | None:
    """The global rank that saved it (its pickled ProcessGroupState)."""
    return _group_field(value, "global_rank")


def _group_field(value: ShardedTensorRecord, name: str) -> int | None:
    state = value.state
    group = state[2] if len(state) > 2 else None
    found = group.field(name) if isinstance(group, Record) else None
    return found if isinstance(found, int) else None
