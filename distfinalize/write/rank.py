"""The write step of one rank: get its tensors, transform them on its device, write its pieces of the files.

A rank writes the pieces the plan gives it (plan.Piece: a byte range of a file, most often the whole file):
the tensors of each, whole or (a tensor cut between ranks) a block of its rows. They come from a feed
(`--strategy read`: this rank reads them; `exchange`: the ranks read their share of the source files and swap
chunks), go through the overlapped pipeline of `overlap.py`, and are written `write_threads` pieces at a time,
each in file order so its sha256 is computed as it is written: the file's, or the piece's.
Memory stays bounded by the bytes in flight (twice `read_batch_bytes`: the batch being read, or with `exchange`
a round's send and receive buffers, and one batch of tensors in the pipeline; a larger tensor comes in blocks of
rows, see feed.read_feed and exchange.py), never by the file or the model. A finished piece leaves a record in
the staging dir's `.progress/`; `--resume` reuses pieces whose record and checksum still match.
Runs on: every rank, each for its own pieces.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from distfinalize.dist.context import DistContext
from distfinalize.errors import DestinationError
from distfinalize.plan import FilePlan, Piece, Plan, TensorPlan, file_layout, piece_parts
from distfinalize.sources import Source, TensorReader
from distfinalize.sources.dcp_metadata import no_gc
from distfinalize.transform.cast import transform
from distfinalize.write.blocks import row_blocks
from distfinalize.write.exchange import ExchangeSchedule, Round, Transfer, plan_exchange, round_budget
from distfinalize.write.exchange import Piece as ExchangePiece
from distfinalize.write.feed import exchange_feed, read_feed
from distfinalize.write.overlap import Item, Stages, Step, lane_order
from distfinalize.write.progress import Meter
from distfinalize.write.writer import FileLayout, SafetensorsWriter, StageBuffer, file_sha256, range_sha256

__all__ = ["DataPath", "WrittenFile", "exchange_schedule", "file_layout", "write_order", "write_rank_files"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WrittenFile:
    """One finished output file, or one rank's piece of it (bytes [offset, offset + size) of a file of
    `file_size` bytes), as reported to rank 0; `sha256` is that of the bytes written."""

    filename: str
    rank: int
    size: int
    tensors: int
    sha256: str
    reused: bool = False
    offset: int = 0
    file_size: int | None = None  # None: the whole file

    @property
    def record_name(self) -> str:
        return piece_name(self.filename, self.offset, self.size, self.file_size)


def piece_name(filename: str, offset: int, size: int, file_size: int | None) -> str:
    """The name of a piece's progress record: the file's name, and for a piece its byte range."""
    return filename if file_size is None else f"{filename}@{offset}-{offset + size}"


@dataclass(frozen=True)
class Share:
    """One piece of one file this rank writes: its byte span in the file and its parts in file order (a tensor,
    rows None, or a block of a tensor's rows [start, stop))."""

    file: FilePlan
    piece: Piece
    layout: FileLayout
    parts: tuple[tuple[TensorPlan, tuple[int, int] | None], ...]

    @property
    def span(self) -> tuple[int, int]:
        """The bytes it writes, from the start of the file (the first piece's include the header)."""
        base = self.layout.data_start
        return (0 if self.piece.start == 0 else base + self.piece.start), base + self.piece.stop

    @property
    def name(self) -> str:
        start, stop = self.span
        return piece_name(self.file.filename, start, stop - start, None if not self.file.shared else self.layout.size)


def shares_for(plan: Plan, rank: int, layouts: dict[str, FileLayout] | None = None) -> list[Share]:
    """The pieces `rank` writes, laid out (each file once, into `layouts` when given). Pure."""
    shares, layouts = [], {} if layouts is None else layouts
    for file, piece in plan.pieces_for(rank):
        laid = layouts.get(file.filename) or layouts.setdefault(file.filename, file_layout(file, plan.metadata))
        shares.append(Share(file, piece, laid, tuple(piece_parts(file, piece, laid))))
    return shares


def share_steps(shares: Sequence[Share], lanes: int) -> list[Step]:
    """The feed order of the shares' parts (overlap.lane_order), each step with its block of rows. Pure."""
    steps, seen = lane_order(shares, lanes, lambda s: [t for t, _ in s.parts]), [0] * len(shares)
    out = []
    for step in steps:
        out.append(replace(step, rows=shares[step.file].parts[seen[step.file]][1]))
        seen[step.file] += 1
    return out


@dataclass(frozen=True)
class DataPath:
    """How a rank's bytes travel: the strategy, bytes per read (or exchange round), files written at once."""

    strategy: str = "read"
    read_batch_bytes: int = 256 * 2**20
    write_threads: int = 2


def write_rank_files(
    plan: Plan,
    ctx: DistContext,
    source: Source,
    directory: Path,
    path: DataPath,
    progress: Meter | None = None,
    progress_dir: Path | None = None,
    resume: bool = False,
) -> list[WrittenFile]:
    """Write every piece the plan gives this rank into `directory`; `progress` counts the bytes written and each
    stage's busy time (write/progress.py). Runs on: every rank (with `exchange`, all ranks together)."""
    shares = shares_for(plan, ctx.rank)
    reused = {s.name: w for s in shares if resume and (w := reusable(s, directory, progress_dir)) is not None}
    for name in reused:
        log.info("resume: reusing %s (size and sha256 match)", name)
    todo = [s for s in shares if s.name not in reused]
    steps = share_steps(todo, path.write_threads)
    if path.strategy == "exchange":
        feed = exchange_plan_feed(plan, ctx, source, path, sorted(reused))
    else:
        reader = source.reader()
        feed = lambda failed: steps_feed(steps, reader, path.read_batch_bytes, failed)  # noqa: E731
    written: dict[str, WrittenFile] = {}
    meter = progress if progress is not None else Meter()
    meter.update(sum(s.piece.nbytes for s in shares if s.name in reused))
    writers = LaneWriters(todo, directory, meter, written, progress_dir)
    # in flight: the batch being read, and up to one batch of read or transformed tensors (overlap.py)
    Stages(steps, path.read_batch_bytes, ctx.device).run(
        metered(feed, meter), lambda inputs, t, start: timed_transform(inputs, t, ctx, meter, start), writers.write_lane
    )
    done = [reused.get(s.name) or written[s.name] for s in shares]
    log.debug("wrote %d piece(s)", len(done))
    return done


def steps_feed(steps: Sequence[Step], reader: TensorReader, batch_bytes: int, failed) -> Iterator[tuple]:
    """The `read` feed of the steps: runs of whole tensors through feed.read_feed, a tensor cut between ranks as
    blocks of its rows [start, stop) of this rank's share. Runs on: each rank."""
    run: list[TensorPlan] = []
    for step in [*steps, None]:
        if step is not None and step.rows is None:
            run.append(step.tensor)
            continue
        yield from read_feed(run, reader, batch_bytes, failed)
        run = []
        if step is None or failed() is not None:
            continue
        t, (first, last) = step.tensor, step.rows
        cuts = reader.row_cuts(t.source_key)
        local = None if cuts is None else [c - first for c in cuts if first < c < last]
        for start, stop in row_blocks(last - first, t.source_nbytes // t.shape[0], batch_bytes, 1, local):
            if failed() is not None:
                return
            yield t, (reader.read_rows(t.source_key, first + start, first + stop),), (first + start, first + stop)


def metered(feed, meter: Meter):
    """`feed`, with the time spent getting each tensor and its bytes counted as the read stage's."""

    def run(failed):
        items = iter(feed(failed))
        while True:
            with meter.busy("read"):
                got = next(items, None)
            if got is None:
                return
            meter.read(sum(x.nbytes for x in got[1]))
            yield got

    return run


def timed_transform(inputs, t: TensorPlan, ctx: DistContext, meter: Meter, start: int | None):
    with meter.busy("transform"):
        return transform(inputs[0], t, ctx.device, inputs[1:], start)


def exchange_plan_feed(plan: Plan, ctx: DistContext, source: Source, path: DataPath, reused: list[str]):
    """The exchange feed: rank 0 (which holds the whole chunk table) schedules every rank's needs, skipping every
    rank's reused files, and each rank receives only its own part of the schedule (`split_schedule`)."""
    skipped = ctx.run_step("exchange plan", lambda: reused, collect="rank0")

    def whole() -> list[ExchangeSchedule]:  # millions of chunk and transfer objects, all alive: the collector paused
        with no_gc():
            return split_schedule(exchange_schedule(plan, source, path, skipped), plan.world_size)

    schedule = relink(ctx.run_step("exchange schedule", whole, ranks="rank0", scatter=True), plan, ctx.rank)
    log.debug(
        "exchange: %d round(s), %d file(s) read here",
        len(schedule.rounds),
        sum(1 for r in schedule.readers.values() if r == ctx.rank),
    )
    reader = source.reader()
    return lambda failed: exchange_feed(schedule, ctx, reader, failed)


def exchange_schedule(
    plan: Plan,
    source: Source,
    path: DataPath,
    skipped: Sequence[Sequence[str]] | None = None,
    rank: int | None = None,
):
    """The exchange schedule for every rank's pieces in feed order, less the pieces each rank reuses; with `rank`,
    only that rank's own transfers are kept. A tensor the plan cuts between ranks is needed by each of its writers
    for its rows. Pure."""
    needs, layouts = {}, {}
    for writer in range(plan.world_size):
        todo = [s for s in shares_for(plan, writer, layouts) if skipped is None or s.name not in skipped[writer]]
        needs[writer] = [(s.tensor, s.rows) for s in share_steps(todo, path.write_threads)]
    return plan_exchange(needs, source.chunks(), plan.world_size, round_budget(path.read_batch_bytes), rank)


def split_schedule(schedule: ExchangeSchedule, world_size: int) -> list[ExchangeSchedule]:
    """Each rank's part of a whole schedule, in one pass: every round (the same count for all), with only the
    transfers that rank sends or receives and the pieces it writes, and the files it reads. Pure."""
    rounds: list[list[Round]] = [[] for _ in range(world_size)]
    for rnd in schedule.rounds:
        moves: list[list[Transfer]] = [[] for _ in range(world_size)]
        held: list[list[ExchangePiece]] = [[] for _ in range(world_size)]
        for t in rnd.transfers:
            moves[t.src].append(t)
            if t.dst != t.src:
                moves[t.dst].append(t)
        for piece in rnd.pieces:
            held[piece.rank].append(piece)
        for rank in range(world_size):
            rounds[rank].append(replace(rnd, transfers=tuple(moves[rank]), pieces=tuple(held[rank])))
    readers: list[dict[str, int]] = [{} for _ in range(world_size)]
    for file, rank in schedule.readers.items():
        readers[rank][file] = rank
    return [replace(schedule, rounds=tuple(rounds[r]), readers=readers[r]) for r in range(world_size)]


def relink(schedule: ExchangeSchedule, plan: Plan, rank: int) -> ExchangeSchedule:
    """`schedule` (this rank's part, received as a copy) holding this rank's own TensorPlan objects, by name: the
    write pipeline follows its tensors by identity. Pure."""
    mine = {t.name: t for f in plan.files_for(rank) for t in f.tensors}
    rounds = (
        replace(r, pieces=tuple(replace(p, tensor=mine[p.tensor.name]) for p in r.pieces)) for r in schedule.rounds
    )
    return replace(schedule, rounds=tuple(rounds))


def write_order(file: FilePlan, metadata: Mapping[str, str] | None = None) -> list[TensorPlan]:
    """A file's tensors in the order their bytes sit in it (so its sha256 is computed while writing)."""
    slots = file_layout(file, metadata).slots
    return sorted(file.tensors, key=lambda t: min(slots[name].start for name in t.outputs))


class LaneWriters:
    """Writes the items of each lane into their files, one file at a time per lane. Runs on: writer threads."""

    def __init__(
        self,
        shares: Sequence[Share],
        directory: Path,
        bar: Meter,
        written: dict[str, WrittenFile],
        progress_dir: Path | None,
    ) -> None:
        self.files, self.directory, self.bar, self.written = shares, directory, bar, written
        self.progress_dir = progress_dir

    def write_lane(self, lane: int, items: Iterator[Item]) -> None:
        writer, left, current = None, 0, -1
        stage = StageBuffer()
        try:
            for item in items:
                if item.step.file != current:
                    current, file = item.step.file, self.files[item.step.file]
                    writer, left = self._open(file, stage), len(file.parts)
                with self.bar.busy("write"):
                    self._write_item(writer, item)
                if not item.last:
                    continue
                left -= 1
                if left == 0:
                    done, writer = writer, None
                    self._close(self.files[current], done)
        except OSError as exc:
            raise self._error(self.files[current], exc) from exc
        finally:
            if writer is not None:
                writer.abort()

    def _write_item(self, writer: SafetensorsWriter, item: Item) -> None:
        """A tensor's outputs, or a block of rows of each (outputs that describe the whole tensor come whole, with
        its first block), in file order."""
        t, slots = item.step.tensor, writer.layout.slots
        for name, tensor in sorted(item.outputs.items(), key=lambda o: slots[o[0]].start):
            shape = slots[name].shape
            if item.rows is None or tuple(tensor.shape) == shape:
                writer.write(name, tensor)
            else:  # the block's rows of this output: the same share of its rows (a 128-row tile: one scale row)
                writer.write(name, tensor, row=item.rows[0] * shape[0] // t.shape[0])
        done = t.nbytes if item.rows is None else t.nbytes * (item.rows[1] - item.rows[0]) // t.shape[0]
        self.bar.update(done)

    def _open(self, share: Share, stage: StageBuffer) -> SafetensorsWriter:
        try:
            return SafetensorsWriter(self.directory / share.file.filename, share.layout, stage, share.span)
        except OSError as exc:
            raise self._error(share, exc) from exc

    def _close(self, share: Share, writer: SafetensorsWriter) -> None:
        digest = writer.close()
        start, stop = share.span
        whole = not share.file.shared
        finished = WrittenFile(
            share.file.filename,
            share.piece.rank,
            os.path.getsize(self.directory / share.file.filename) if whole else stop - start,
            len(share.parts),
            digest,
            offset=start,
            file_size=None if whole else share.layout.size,
        )
        if self.progress_dir is not None:
            record_progress(self.progress_dir, finished)
        self.written[share.name] = finished

    def _error(self, share: Share, exc: OSError) -> DestinationError:
        return DestinationError(
            f"cannot write {share.file.filename}",
            where=self.directory,
            hint=f"{exc.strerror or exc}; free space or choose another DEST",
        )


def record_progress(progress_dir: Path, written: WrittenFile) -> None:
    """Atomically record a finished file or piece (written after its bytes were fsynced)."""
    tmp = progress_dir / f"{written.record_name}.json.tmp"
    tmp.write_text(json.dumps(asdict(written)))
    os.replace(tmp, progress_dir / f"{written.record_name}.json")


def reusable(share: Share, directory: Path, progress_dir: Path | None) -> WrittenFile | None:
    """The record of a file or piece an interrupted run finished, when the bytes on disk still match it."""
    if progress_dir is None:
        return None
    record_path, path = progress_dir / f"{share.name}.json", directory / share.file.filename
    try:
        record = WrittenFile(**json.loads(record_path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
    start, stop = share.span
    whole = record.file_size is None
    size = record.size if whole else record.file_size
    if (
        not path.is_file()
        or path.stat().st_size != size
        or size != share.layout.size
        or record.tensors != len(share.parts)
        or (record.offset, record.offset + record.size) != (start, stop)
    ):
        return None
    if (file_sha256(path) if whole else range_sha256(path, start, stop)) != record.sha256:
        log.warning("resume: %s does not match its record; writing it again", share.name)
        return None
    return replace(record, rank=share.piece.rank, reused=True)
