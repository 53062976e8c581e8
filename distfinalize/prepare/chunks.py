"""Metadata read once: rank 0 reads a DCP checkpoint's `.metadata`; the other ranks get only what they need.

1. `read_checkpoint` (rank 0, the pipeline's "metadata" step) opens the DCP source, which reads and checks
   `.metadata` and keeps the model's chunk table; every other rank receives `DcpShared` (the model tensors' names,
   shapes and dtypes, the skipped-entry count, the data files): what prepare and the plan need, the same on every
   rank, so the plan stays a pure function computed everywhere.
2. `Checkpoint.open` is prepare's opener: rank 0 reuses its source, the others open one from `DcpShared`, with no
   chunks.
3. `share_chunks` (one step, a scatter from rank 0) gives each rank the chunk lists it reads, and nothing else:
   with `--strategy read` the chunks of the tensors its plan writes (`plan_parts`), with `exchange` the chunks
   stored in the files it reads (`reading_parts`), for the non-finite scan those of its share. What a rank
   receives is bounded by its own share, never ranks x tensors.

Not a DCP checkpoint, or a single process: nothing is shared (the source reads its own metadata as before).
Runs on: all ranks (rank 0 reads; the others receive).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from distfinalize.config import FinalizeConfig
from distfinalize.dist.context import DistContext
from distfinalize.plan import Plan, file_layout, piece_parts
from distfinalize.sources import Source
from distfinalize.sources.dcp import DCP_FORMAT, DcpSource
from distfinalize.sources.dcp_table import ChunkTable, DcpShared, by_reader, trim
from distfinalize.sources.locate import Located, locate
from distfinalize.write.exchange import assign_readers

Parts = Callable[[DcpSource], list[ChunkTable]]  # rank 0's table -> one part per rank


def read_checkpoint(config: FinalizeConfig) -> DcpSource | None:
    """The checkpoint opened with its whole chunk table, when it is a DCP folder. Runs on: rank 0."""
    located = locate(config.src, config.checkpoint, config.tag)
    if located.format is not DCP_FORMAT:
        return None
    return DcpSource(located.path, located.step)


def shared_of(source: DcpSource | None) -> DcpShared | None:
    """What the other ranks receive of rank 0's source: its tensor table, no chunks. Pure."""
    return source.shared if source is not None else None


@dataclass
class Checkpoint:
    """This rank's DCP checkpoint: what the "metadata" step gave it (rank 0 its source, the others DcpShared, or
    None for another format), and the source prepare opened from it (where `share_chunks` installs chunks)."""

    given: DcpSource | DcpShared | None
    source: DcpSource | None = None

    def open(self, located: Located) -> Source:
        """prepare's opener: rank 0's source as it is, another rank's from the shared table (no chunks yet)."""
        if isinstance(self.given, DcpSource) and located.path.resolve() == self.given.path.resolve():
            self.source = self.given
        elif isinstance(self.given, DcpShared) and located.format is DCP_FORMAT:
            self.source = DcpSource(located.path, located.step, shared=self.given)
        else:
            return located.format.open(located.path, located.step)
        return self.source

    @property
    def shared(self) -> bool:
        """Whether chunks are shared (a DCP checkpoint): the same on every rank, as `given` was broadcast."""
        return self.given is not None


def share_chunks(ctx: DistContext, checkpoint: Checkpoint, step: str, parts: Parts) -> None:
    """Rank 0 splits its chunk table into one part per rank (`parts`); each rank receives and installs its own.
    Nothing to do for a single process or another format. Runs on: all ranks."""
    if ctx.world_size == 1 or not checkpoint.shared:
        return
    source = checkpoint.source
    part = ctx.run_step(step, lambda: parts(source), ranks="rank0", scatter=True)
    if not ctx.is_rank0 and source is not None:
        source.install(part)


def plan_parts(plan: Plan) -> Parts:
    """`--strategy read`: each rank's part is the chunk lists of the tensors its pieces hold (their source keys; a
    tensor cut between ranks goes whole to each of them)."""

    def parts(source: DcpSource) -> list[ChunkTable]:
        keys: list[set[str]] = [set() for _ in range(plan.world_size)]
        for f in plan.files:
            laid = file_layout(f, plan.metadata) if f.shared else None
            for p in f.ranges:
                held = f.tensors if laid is None else [t for t, _ in piece_parts(f, p, laid)]
                keys[p.rank].update(key for t in held for key in t.source_keys)
        return [trim(source.table, mine) for mine in keys]

    return parts


def reading_parts(world_size: int) -> Parts:
    """`--strategy exchange`: each rank's part is the chunks stored in the files it reads (exchange's readers)."""

    def parts(source: DcpSource) -> list[ChunkTable]:
        return by_reader(source.table, assign_readers(source.files(), world_size), world_size)

    return parts


def key_parts(shares: Sequence[Iterable[str]]) -> Parts:
    """Each rank's part is the chunk lists of the keys of its share (`shares[rank]`)."""
    return lambda source: [trim(source.table, keys) for keys in shares]
