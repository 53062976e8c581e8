"""The plan: which tensor goes to which output file in which dtype, and which ranks write each file.

The job's bytes are spread evenly over the ranks: each file's data region is cut into contiguous pieces, each
written by one rank (most files by one rank alone). Pure and deterministic: built from metadata alone,
identical on every rank without talking. Runs on: all ranks.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch

from distfinalize.hfnames import SINGLE_FILE
from distfinalize.layout import FileLayout, grouped_layout
from distfinalize.pieces import Piece, Segment, split_pieces
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
        quantizes it (the quantizer goes over each of them; its output is smaller). The pieces balance it."""
        return self.nbytes + (self.source_nbytes if self.quant is not None else 0)

    @property
    def row_cuttable(self) -> bool:
        """Whether several ranks may write it, each a block of its rows: a plain cast of a tensor with rows. A
        quantized weight stays whole (its scales lie after its data), and so does what needs the whole tensor
        (a LoRA merge, a rotary permutation, a vocabulary resize)."""
        plain = self.quant is None and self.lora is None and self.rope_heads is None and self.resize is None
        return plain and len(self.shape) >= 1 and self.shape[0] > 1


@dataclass(frozen=True)
class FilePlan:
    """One output safetensors file, the rank that writes its header, and the pieces the ranks write (none: the
    whole file, by `rank`)."""

    filename: str
    rank: int
    tensors: tuple[TensorPlan, ...]
    pieces: tuple[Piece, ...] = ()

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def ranges(self) -> tuple[Piece, ...]:
        """The pieces in file order, covering the data region exactly once."""
        return self.pieces or (Piece(self.rank, 0, self.nbytes),)

    @property
    def shared(self) -> bool:
        """Whether several pieces (so, in general, several ranks) make it."""
        return len(self.ranges) > 1


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

    @cached_property
    def _by_rank(self) -> dict[int, tuple[tuple[FilePlan, Piece], ...]]:
        by_rank: dict[int, list[tuple[FilePlan, Piece]]] = {}
        for f in self.files:
            for p in f.ranges:
                by_rank.setdefault(p.rank, []).append((f, p))
        return {rank: tuple(pieces) for rank, pieces in by_rank.items()}

    def pieces_for(self, rank: int) -> tuple[tuple[FilePlan, Piece], ...]:
        """The pieces `rank` writes, in file order."""
        return self._by_rank.get(rank, ())

    def files_for(self, rank: int) -> tuple[FilePlan, ...]:
        """The files `rank` writes some of."""
        return tuple(dict.fromkeys(f for f, _ in self.pieces_for(rank)))

    def bytes_for(self, rank: int) -> int:
        return sum(p.nbytes for _, p in self.pieces_for(rank))


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

    Uses huggingface_hub's splitter (the factory `save_pretrained`'s torch splitter is built on), sized by each
    tensor's output bytes and with no storage shared (as for meta tensors), so names and grouping match
    `save_pretrained`: in order, a new file when the next tensor would overflow, oversized tensors alone.
    """
    from huggingface_hub.serialization import split_state_dict_into_shards_factory

    by_name = {t.name: t for t in tensors}
    split = split_state_dict_into_shards_factory(
        {t.name: t.nbytes for t in tensors},
        get_storage_size=lambda nbytes: nbytes,
        get_storage_id=lambda _: None,
        filename_pattern=FILENAME_PATTERN,
        max_shard_size=max_shard_size,
    )
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
    row_cuts: bool = True,
) -> Plan:
    """The whole plan from the (already renamed and ordered) checkpoint tensors; everything in one file named
    `single_file` when given (a PEFT adapter: peft loads only adapter_model.safetensors). The bytes are cut into
    pieces evenly over the ranks (`split_pieces`), between tensors, or with `row_cuts` also between the rows of a
    tensor that allows it (TensorPlan.row_cuttable)."""
    planned = plan_tensors(tensors, dtype, resizes, rope_heads, quant, merges)
    groups = [list(planned)] if single_file else split_into_files(planned, max_shard_size)
    names = [single_file] if single_file else file_names(len(groups))
    metadata = file_metadata([t for g in groups for t in g])
    files = tuple(FilePlan(n, 0, tuple(g)) for n, g in zip(names, groups, strict=True))
    return assign_pieces(Plan(files, world_size, metadata), world_size, row_cuts)


def assign_pieces(plan: Plan, world_size: int, row_cuts: bool = True) -> Plan:
    """The same files cut into pieces for `world_size` ranks (split_pieces). Pure."""
    segments = [file_segments(f, plan.metadata, row_cuts) for f in plan.files]
    pieces = split_pieces([(f.nbytes, s) for f, s in zip(plan.files, segments, strict=True)], world_size)
    files = tuple(
        FilePlan(f.filename, p[0].rank, f.tensors, tuple(p) if len(p) > 1 else ())
        for f, p in zip(plan.files, pieces, strict=True)
    )
    return Plan(files, world_size, plan.metadata)


def file_layout(file: FilePlan, metadata: Mapping[str, str] | None = None) -> FileLayout:
    """The file's safetensors layout; `metadata` (a recipe's, e.g. torchao's) joins the header's {"format": "pt"}.

    A file without quantized weights is laid out as the safetensors library lays it out (byte-identical to
    save_file's). A file with quantized weights keeps each weight's outputs together, in the recipe's order
    (the quantized data, then its scales), the weights in the plan's order: the library's order would put every
    float32 scale before all the data, so no weight could be written (and hashed, and sent past the page cache)
    before the last one was quantized. Loaders find tensors by the header's offsets, whatever their order; when
    that order would leave a tensor misaligned for its dtype, the library's is used. Pure.
    """
    tensors = [(name, shape, dtype) for t in file.tensors for name, (shape, dtype) in t.outputs.items()]
    return grouped_layout(tensors, metadata, any(t.quant is not None for t in file.tensors))


def tensor_spans(file: FilePlan, file_layout_: FileLayout) -> list[tuple[int, int, TensorPlan]]:
    """Each tensor's bytes [start, stop) in the data region (from its first output to its last), in file order."""
    base, slots = file_layout_.data_start, file_layout_.slots
    spans = [
        (min(slots[n].start for n in t.outputs) - base, max(slots[n].end for n in t.outputs) - base, t)
        for t in file.tensors
    ]
    return sorted(spans, key=lambda s: (s[0], s[1]))


def file_segments(file: FilePlan, metadata: Mapping[str, str] | None, row_cuts: bool) -> list[Segment]:
    """Where a file may be cut: between tensors (tensors whose bytes interleave stay together), and with
    `row_cuts` between the rows of a row-cuttable tensor; each segment weighs its bytes plus the source bytes of
    the weights it quantizes (TensorPlan.work). Pure."""
    segments: list[Segment] = []
    for start, stop, t in tensor_spans(file, file_layout(file, metadata)):
        extra = t.work - t.nbytes  # a quantized weight's source bytes: its rank reads and quantizes them too
        if segments and start < segments[-1].stop:  # interleaved with the one before (a library-ordered scale)
            last = segments[-1]
            segments[-1] = Segment(last.start, max(last.stop, stop), 0, last.extra_work + extra)
            continue
        rows = t.shape[0] if t.shape else 0
        cut = row_cuts and t.row_cuttable and (stop - start) % rows == 0
        segments.append(Segment(start, stop, (stop - start) // rows if cut else 0, extra))
    return segments


def piece_parts(
    file: FilePlan, piece: Piece, file_layout_: FileLayout
) -> list[tuple[TensorPlan, tuple[int, int] | None]]:
    """What a piece holds, in file order: whole tensors (rows None) and blocks of rows [start, stop) of a tensor
    cut between rows; a tensor with no bytes goes with the piece its offset falls in (the last piece, at the
    end). Pure."""
    parts: list[tuple[TensorPlan, tuple[int, int] | None]] = []
    last = piece.stop == file.nbytes
    for start, stop, t in tensor_spans(file, file_layout_):
        if start == stop:
            if piece.start <= start < piece.stop or (last and start == piece.stop):
                parts.append((t, None))
        elif piece.start <= start and stop <= piece.stop:
            parts.append((t, None))
        elif start < piece.stop and stop > piece.start:
            row = (stop - start) // t.shape[0]
            parts.append((t, ((max(piece.start, start) - start) // row, (min(piece.stop, stop) - start) // row)))
    return parts


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
    """A JSON-able summary of the plan (for --dry-run and inspect): a file written by several ranks lists its
    pieces (bytes of its data region and the rank that writes them)."""
    per_rank = [0] * plan.world_size
    for f in plan.files:
        for p in f.ranges:
            per_rank[p.rank] += p.nbytes
    return {
        "world_size": plan.world_size,
        "total_size": plan.total_size,
        "tensors": len(plan.tensors),
        "files": [
            {
                "file": f.filename,
                "rank": f.rank,
                "bytes": f.nbytes,
                "tensors": len(f.tensors),
                **({"pieces": [{"rank": p.rank, "bytes": [p.start, p.stop]} for p in f.ranges]} if f.shared else {}),
            }
            for f in plan.files
        ],
        "bytes_per_rank": per_rank,
    }
