"""Per-rank `torch.save` files of a sharded state dict (verl, Accelerate without DCP): safe loading and the layout.

Each file is one training rank's `model.state_dict()` under FSDP2, or FSDP1 with a device mesh and
SHARDED_STATE_DICT: a dict of DTensors whose `_local_tensor` is that rank's piece. The whole layout follows from
one file's metadata: every DTensor records its global shape, its placements and the device mesh (the global rank
at each mesh coordinate), and DTensor's `Shard(dim)` splits like `torch.chunk`. So every rank plans from rank 0's
file alone, and a reader works out which files hold the pieces of the tensors it writes.

Loading is `torch.load(weights_only=True, map_location="meta")`: no tensor data is read, each storage records its
byte offset in the file, and the pickle may name only torch's own DTensor classes (ALLOWED, through
`torch.serialization.safe_globals`); anything else is refused (UnsafeClassError), never unpickled. The reader
then reads each piece's bytes with positioned reads. What remains per file is the pickle itself, which
`torch.load` parses whole: a rank parses the pickle of rank 0's file and of each file it reads pieces from, once.
Runs on: all ranks (metadata), each rank for its own tensors (reads).
"""

from __future__ import annotations

import logging
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from distfinalize.errors import SourceError
from distfinalize.sources.fileread import read_exact, stored_offset
from distfinalize.sources.shardedtensor import (
    SUBSTITUTES,
    ShardedTensorRecord,
    local_tensors,
    saved_world_size,
    saving_rank,
    shards_of,
)

log = logging.getLogger(__name__)

_GRIDS: dict[tuple, tuple] = {}  # one object per distinct device mesh: Stored equality is then an identity check
_POSITIONS: dict[int, dict[int, tuple[int, ...]]] = {}  # id(grid) -> global rank -> its mesh coordinate
UNSAFE_GLOBAL = re.compile(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)")  # a class, or a function of a blocked module


@cache
def allowed_globals() -> tuple[type, ...]:
    """The classes a per-rank file may name beyond what weights_only always allows: a DTensor, its spec, the
    device mesh it lives on and its placements (Shard, Replicate). DeviceMesh's unpickling runs torch's own code
    and builds no process group."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor import _dtensor_spec as spec

    extra = tuple(getattr(spec, n) for n in ("ShardOrderEntry",) if hasattr(spec, n))  # newer torch only
    return (DTensor, spec.DTensorSpec, spec.TensorMeta, DeviceMesh, Shard, Replicate, *extra)


def load_rank_file(path: Path, hint: str) -> dict:
    """The state dict of one file, tensors on the meta device knowing their byte offsets. Raises SourceError
    naming the file for a missing, truncated, foreign or unsafe one (`hint` says what to do)."""
    try:
        with torch.serialization.safe_globals([*allowed_globals(), *SUBSTITUTES]), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DeviceMesh warns that it is unpickled without process groups
            data = torch.load(str(path), map_location="meta", weights_only=True)
    except FileNotFoundError as exc:
        raise SourceError("a rank's checkpoint file is missing", where=path, hint=hint) from exc
    except OSError as exc:
        raise SourceError("cannot read checkpoint file", where=path, hint=exc.strerror or str(exc)) from exc
    except pickle.UnpicklingError as exc:
        unsafe = UNSAFE_GLOBAL.search(str(exc))
        if unsafe:
            raise SourceError(
                f"the checkpoint file names {unsafe.group(1)}, which distfinalize does not unpickle",
                where=path,
                hint="only tensors, DTensors and their placements are read (torch.load weights_only=True); re-save "
                "the model's state dict alone",
            ) from exc
        raise SourceError("not a readable torch.save file", where=path, hint=_damaged(exc, hint)) from exc
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, KeyError) as exc:
        raise SourceError("not a readable torch.save file", where=path, hint=_damaged(exc, hint)) from exc
    if not isinstance(data, dict):
        raise SourceError(f"the checkpoint file holds a {type(data).__name__}, not a state dict", where=path)
    return data


def _damaged(exc: BaseException, hint: str) -> str:
    """`hint`, after the first sentence of what torch.load said."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"it is truncated or damaged ({text.split('. ')[0].rstrip('.')}); {hint}"


@dataclass(frozen=True)
class Piece:
    """A part of a tensor that one rank's file holds: the saving rank, and where the part sits."""

    rank: int
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


@dataclass(frozen=True)
class Stored:
    """One entry of a rank file: the global tensor and how it is split over the saving ranks."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    placements: tuple[tuple[str, int], ...]  # per mesh dim: ("shard", dim) or ("replicate", -1)
    mesh: tuple[tuple[int, ...], ...] | None  # mesh shape, then the global ranks in mesh order (row-major)
    listed: tuple[Piece, ...] | None = None  # a ShardedTensor: every shard, as its metadata lists them
    world: int | None = None  # a ShardedTensor: the world size of the group that saved it


def describe(value: object, path: Path, key: str, meshes: dict[int, tuple]) -> Stored | None:
    """A DTensor, a ShardedTensor or a plain tensor (saved whole: a replicated buffer) as Stored; None for anything
    else. `meshes` caches each device mesh of one file (all its DTensors share one), so a file costs O(its tensors),
    not O(tensors x ranks)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if isinstance(value, ShardedTensorRecord):
        listed = shards_of(value)
        if listed is None:
            raise SourceError(f"tensor {key!r} is a ShardedTensor without readable shard metadata", where=path)
        found = tuple(Piece(s.rank, s.offsets, s.sizes) for s in listed)
        return Stored(tuple(value.shape), value.dtype, (), None, found, saved_world_size(value))

    if isinstance(value, DTensor):
        placements = []
        for p in value.placements:
            if type(p) is Shard:
                placements.append(("shard", p.dim))
            elif type(p) is Replicate:
                placements.append(("replicate", -1))
            else:
                raise SourceError(
                    f"tensor {key!r} is placed as {p}, which distfinalize does not read",
                    where=path,
                    hint="only Shard(dim) and Replicate() placements (FSDP, HSDP) are supported",
                )
        grid = meshes.get(id(value.device_mesh))
        if grid is None:
            mesh = mesh_ranks(value.device_mesh, path, key)
            grid = (tuple(mesh.shape), tuple(int(r) for r in mesh.flatten().tolist()))
            grid = meshes[id(value.device_mesh)] = _GRIDS.setdefault(grid, grid)
        return Stored(tuple(value.shape), value.dtype, tuple(placements), grid)
    if isinstance(value, torch.Tensor):
        return Stored(tuple(value.shape), value.dtype, (), None)
    return None


def mesh_ranks(mesh: object, path: Path, key: str) -> torch.Tensor:
    """The global ranks of a meta-loaded DeviceMesh, in mesh shape: its rank map is read from the file (a few
    bytes). Newer torch keeps `_rank_map` + `_layout`, older torch the `mesh` tensor itself."""
    state = vars(mesh)
    stored = state.get("_rank_map", state.get("mesh"))
    if not isinstance(stored, torch.Tensor):
        raise SourceError(f"tensor {key!r} has a device mesh without ranks", where=path, hint="the file is corrupt")
    ranks = stored
    if stored.device.type == "meta":
        ranks = torch.empty(stored.shape, dtype=stored.dtype)
        with open(path, "rb", buffering=0) as handle:
            read_exact(handle, stored_offset(stored, path), memoryview(ranks.view(torch.uint8).numpy()).cast("B"), path)
    if "_rank_map" not in state:
        return ranks
    full = mesh._layout.remap_to_tensor(ranks)
    if full.size(0) != 1:
        raise SourceError(
            f"tensor {key!r} lives on a slice of a larger device mesh",
            where=path,
            hint="only whole FSDP / HSDP meshes are supported",
        )
    return full[0]


def pieces(stored: Stored, own_rank: int) -> list[Piece]:
    """The distinct non-empty pieces of a tensor, each from the first rank (in mesh order) that holds it: replicas
    (Replicate dims, e.g. HSDP's ddp dim) are read once. A plain tensor comes whole from `own_rank`'s file. Pure."""
    if stored.listed is not None:
        return list({p.offsets: p for p in reversed(stored.listed) if all(p.sizes)}.values())[::-1]
    if stored.mesh is None:
        return [Piece(own_rank, (0,) * len(stored.shape), stored.shape)]
    mesh_shape, ranks = stored.mesh
    out: dict[tuple[int, ...], Piece] = {}
    for position, coordinate in enumerate(_coordinates(mesh_shape)):
        offsets, sizes = chunk_of(stored.shape, mesh_shape, coordinate, stored.placements)
        if all(sizes) and offsets not in out:
            out[offsets] = Piece(ranks[position], offsets, sizes)
    return list(out.values())


def chunk_of(
    shape: Sequence[int], mesh_shape: Sequence[int], coordinate: Sequence[int], placements: Sequence[tuple[str, int]]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(offsets, sizes) of the piece at a mesh coordinate: Shard(d) splits like torch.chunk, mesh dims in order
    (torch.distributed.tensor's own rule). Pure."""
    offsets, sizes = [0] * len(shape), list(shape)
    for (kind, dim), n, c in zip(placements, mesh_shape, coordinate, strict=True):
        if kind != "shard":
            continue
        step = -(-sizes[dim] // n)  # ceil
        start = min(c * step, sizes[dim])
        offsets[dim] += start
        sizes[dim] = min(sizes[dim], start + step) - start
    return tuple(offsets), tuple(sizes)


def coordinate_of(grid: tuple, rank: int) -> tuple[int, ...] | None:
    """The mesh coordinate of a global rank in an interned grid (from describe), looked up in O(1)."""
    positions = _POSITIONS.get(id(grid))
    if positions is None:
        mesh_shape, ranks = grid
        positions = _POSITIONS[id(grid)] = dict(zip(ranks, _coordinates(mesh_shape), strict=True))
    return positions.get(rank)


def _coordinates(mesh_shape: Sequence[int]) -> Iterator[tuple[int, ...]]:
    coordinate = [0] * len(mesh_shape)
    total = 1
    for n in mesh_shape:
        total *= n
    for _ in range(total):
        yield tuple(coordinate)
        for d in reversed(range(len(mesh_shape))):
            coordinate[d] += 1
            if coordinate[d] < mesh_shape[d]:
                break
            coordinate[d] = 0


def local_of(value: object) -> torch.Tensor | None:
    """The rank's own piece of a stored value: the DTensor's local tensor, a ShardedTensor's one local shard (None
    when it holds none), or the tensor itself."""
    if isinstance(value, ShardedTensorRecord):
        local = local_tensors(value)
        return local[0][1] if len(local) == 1 else None
    return getattr(value, "_local_tensor", value)


def saved_by(value: object) -> int | None:
    """The rank that saved a DTensor (its device mesh records it) or a ShardedTensor (its process group state)."""
    if isinstance(value, ShardedTensorRecord):
        return saving_rank(value)
    mesh = getattr(value, "device_mesh", None) if hasattr(value, "_local_tensor") else None
    rank = vars(mesh).get("_rank") if mesh is not None else None
    return rank if isinstance(rank, int) else None
