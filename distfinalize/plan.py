"""The plan: which tensor goes to which output file in which dtype, and which rank writes each file.

Pure and deterministic: built from metadata alone, identical on every rank without talking.
Runs on: all ranks.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from distfinalize.hfnames import SINGLE_FILE
from distfinalize.sources import TensorMeta
from distfinalize.transform.lora import LoraMerge
from distfinalize.transform.vocab import RowResize

FILENAME_PATTERN = "model{suffix}.safetensors"


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: its name, where it comes from, its output shape and dtype, and any row resize."""

    name: str
    source_key: str
    shape: tuple[int, ...]
    source_dtype: torch.dtype
    dtype: torch.dtype
    source_shape: tuple[int, ...] | None = None  # when it differs from `shape` (vocabulary resize)
    resize: RowResize | None = None
    rope_heads: int | None = None  # q/k rows to permute from the interleaved rotary layout
    quant: str | None = None  # the --quantize recipe, when this weight is quantized
    lora: LoraMerge | None = None  # --merge-lora: the adapter merged into this weight

    @property
    def source_keys(self) -> tuple[str, ...]:
        """Every checkpoint key this tensor is made from."""
        return (self.source_key, *(self.lora.keys if self.lora is not None else ()))

    @property
    def outputs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The tensors written for it: itself, or the recipe's (e.g. weight + weight_scale)."""
        if self.quant is None:
            return {self.name: (self.shape, self.dtype)}
        from distfinalize.transform.quant.recipes import get_recipe

        return get_recipe(self.quant).outputs(self.name, self.shape, self.dtype)

    @property
    def nbytes(self) -> int:
        return sum(torch.Size(shape).numel() * dtype.itemsize for shape, dtype in self.outputs.values())

    @property
    def source_nbytes(self) -> int:
        lora = self.lora.nbytes if self.lora is not None else 0
        return torch.Size(self.source_shape or self.shape).numel() * self.source_dtype.itemsize + lora

    @property
    def work(self) -> int:
        """What writing it costs its rank, in bytes: its output bytes, plus its source bytes when a recipe
        quantizes it (the quantizer goes over each of them; its output is smaller). assign_ranks balances it."""
        return self.nbytes + (self.source_nbytes if self.quant is not None else 0)


@dataclass(frozen=True)
class FilePlan:
    """One output safetensors file and the rank that writes it."""

    filename: str
    rank: int
    tensors: tuple[TensorPlan, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def work(self) -> int:
        return sum(t.work for t in self.tensors)


@dataclass(frozen=True)
class Plan:
    """Every output file, in order, for a job of `world_size` ranks, and the header metadata each file carries."""

    files: tuple[FilePlan, ...]
    world_size: int
    metadata: Mapping[str, str] = field(default_factory=dict)  # besides {"format": "pt"}; from the recipe

    @property
    def sharded(self) -> bool:
        return len(self.files) > 1

    @property
    def total_size(self) -> int:
        return sum(f.nbytes for f in self.files)

    @property
    def tensors(self) -> tuple[TensorPlan, ...]:
        return tuple(t for f in self.files for t in f.tensors)

    @property
    def weight_map(self) -> dict[str, str]:
        return {name: f.filename for f in self.files for t in f.tensors for name in t.outputs}

    def files_for(self, rank: int) -> tuple[FilePlan, ...]:
        return tuple(f for f in self.files if f.rank == rank)

    def bytes_for(self, rank: int) -> int:
        return sum(f.nbytes for f in self.files_for(rank))


def output_dtype(stored: torch.dtype, target: torch.dtype | None) -> torch.dtype:
    """Floating tensors take the target dtype; integer and bool tensors (and no target) keep theirs."""
    if target is None or not stored.is_floating_point:
        return stored
    return target


def plan_tensors(
    tensors: Sequence[TensorMeta],
    dtype: torch.dtype | None,
    resizes: Mapping[str, RowResize] | None = None,
    rope_heads: Mapping[str, int] | None = None,
    quant: Mapping[str, str] | None = None,
    merges: Mapping[str, LoraMerge] | None = None,
) -> tuple[TensorPlan, ...]:
    """One TensorPlan per checkpoint tensor, in the given order, cast to `dtype` where it applies."""
    resizes, rope_heads, quant, merges = resizes or {}, rope_heads or {}, quant or {}, merges or {}
    out = []
    for t in tensors:
        resize = resizes.get(t.name)
        shape = tuple(t.shape) if resize is None else (resize.rows, *t.shape[1:])
        source_shape = tuple(t.shape) if resize is not None else None
        out.append(
            TensorPlan(
                t.name,
                t.key,
                shape,
                t.dtype,
                output_dtype(t.dtype, dtype),
                source_shape,
                resize,
                rope_heads.get(t.name),
                quant.get(t.name),
                merges.get(t.name),
            )
        )
    return tuple(out)


def split_into_files(tensors: Sequence[TensorPlan], max_shard_size: int) -> list[list[TensorPlan]]:
    """Group tensors into files no bigger than `max_shard_size` the way transformers does.

    Uses huggingface_hub's splitter on meta tensors (no memory), so names and grouping match
    `save_pretrained`: in order, a new file when the next tensor would overflow, oversized tensors alone.
    """
    from huggingface_hub import split_torch_state_dict_into_shards

    by_name = {t.name: t for t in tensors}
    meta = {t.name: torch.empty((t.nbytes,), dtype=torch.uint8, device="meta") for t in tensors}  # sized by bytes
    split = split_torch_state_dict_into_shards(meta, filename_pattern=FILENAME_PATTERN, max_shard_size=max_shard_size)
    return [[by_name[n] for n in names] for names in split.filename_to_tensors.values()]


def assign_ranks(sizes: Sequence[int], world_size: int) -> list[int]:
    """Give each file a rank, balancing sizes (a plan's: its files' work): biggest first to the least-loaded rank
    (lowest on ties)."""
    load = [(0, r) for r in range(world_size)]
    heapq.heapify(load)
    ranks = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        total, rank = heapq.heappop(load)
        ranks[i] = rank
        heapq.heappush(load, (total + sizes[i], rank))
    return ranks


def file_names(count: int) -> list[str]:
    """transformers' names: model.safetensors, or model-0000k-of-0000N.safetensors."""
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]


def build_plan(
    tensors: Sequence[TensorMeta],
    *,
    dtype: torch.dtype | None,
    max_shard_size: int,
    world_size: int,
    resizes: Mapping[str, RowResize] | None = None,
    rope_heads: Mapping[str, int] | None = None,
    quant: Mapping[str, str] | None = None,
    merges: Mapping[str, LoraMerge] | None = None,
    single_file: str | None = None,
) -> Plan:
    """The whole plan from the (already renamed and ordered) checkpoint tensors; everything in one file named
    `single_file` when given (a PEFT adapter: peft loads only adapter_model.safetensors)."""
    planned = plan_tensors(tensors, dtype, resizes, rope_heads, quant, merges)
    groups = [list(planned)] if single_file else split_into_files(planned, max_shard_size)
    names = [single_file] if single_file else file_names(len(groups))
    ranks = assign_ranks([sum(t.work for t in g) for g in groups], world_size)
    files = tuple(FilePlan(n, r, tuple(g)) for n, r, g in zip(names, ranks, groups, strict=True))
    return Plan(files, world_size, file_metadata([t for g in groups for t in g]))


def file_metadata(tensors: Sequence[TensorPlan]) -> dict[str, str]:
    """The header metadata the quantization recipe asks every file to carry (Recipe.file_metadata). Pure."""
    recipes = sorted({t.quant for t in tensors if t.quant is not None})
    if not recipes:
        return {}
    from distfinalize.transform.quant.recipes import get_recipe

    described = [(t.name, t.shape, t.dtype, t.quant is not None) for t in tensors]
    return {k: v for name in recipes for k, v in get_recipe(name).file_metadata(described).items()}


def fingerprint(plan: Plan, inputs: Sequence[str] = ()) -> str:
    """A digest of everything that decides the output bytes (not which rank writes what), and of the `inputs`
    they are read from (the checkpoint, --base-model). For --resume."""
    import hashlib
    import json

    files = [
        [
            f.filename,
            [
                [
                    t.name,
                    t.source_key,
                    list(t.shape),
                    str(t.source_dtype),
                    str(t.dtype),
                    repr(t.resize),
                    t.rope_heads,
                    t.quant,
                    repr(t.lora),
                ]
                for t in f.tensors
            ],
        ]
        for f in plan.files
    ]
    return hashlib.sha256(json.dumps([files, dict(plan.metadata), list(inputs)]).encode()).hexdigest()


def describe(plan: Plan) -> Mapping[str, object]:
    """A JSON-able summary of the plan (for --dry-run and inspect)."""
    return {
        "world_size": plan.world_size,
        "total_size": plan.total_size,
        "tensors": len(plan.tensors),
        "files": [
            {"file": f.filename, "rank": f.rank, "bytes": f.nbytes, "tensors": len(f.tensors)} for f in plan.files
        ],
        "bytes_per_rank": [plan.bytes_for(r) for r in range(plan.world_size)],
    }
