"""The write step of one rank: get its tensors, transform them on its device, write its files.

The tensors come from a feed (`--strategy read`: this rank reads them; `exchange`: the ranks read their
share of the source files and swap chunks), go through the overlapped pipeline of `overlap.py`, and are
written `write_threads` files at a time, each in file order so its sha256 is computed as it is written.
Memory stays bounded by the bytes in flight (twice `read_batch_bytes`: the batch being read and one batch of
tensors in the pipeline; with `read`, a larger tensor comes in blocks of rows, see feed.read_feed; with
`exchange`, it travels whole), never by the file or the model. A finished file leaves a record in the staging
dir's `.progress/`; `--resume` reuses files whose record and checksum still match.
Runs on: every rank, each for its own files.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

from distfinalize.dist.context import DistContext
from distfinalize.errors import DestinationError
from distfinalize.plan import FilePlan, Plan, TensorPlan
from distfinalize.sources import Source
from distfinalize.transform.cast import transform
from distfinalize.write.exchange import ExchangeSchedule, Round, Transfer, plan_exchange
from distfinalize.write.feed import exchange_feed, read_feed
from distfinalize.write.overlap import Item, Stages, lane_order
from distfinalize.write.progress import Meter
from distfinalize.write.writer import (
    DEFAULT_METADATA,
    FileLayout,
    SafetensorsWriter,
    StageBuffer,
    aligned,
    file_sha256,
    layout,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WrittenFile:
    """One finished output file, as reported to rank 0."""

    filename: str
    rank: int
    size: int
    tensors: int
    sha256: str
    reused: bool = False


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
    """Write every file the plan gives this rank into `directory`; `progress` counts the bytes written and each
    stage's busy time (write/progress.py). Runs on: every rank (with `exchange`, all ranks together)."""
    files = plan.files_for(ctx.rank)
    reused = {f.filename: w for f in files if resume and (w := reusable(f, directory, progress_dir)) is not None}
    for name in reused:
        log.info("resume: reusing %s (size and sha256 match)", name)
    todo = [f for f in files if f.filename not in reused]
    order = partial(write_order, metadata=plan.metadata)
    steps = lane_order(todo, path.write_threads, order)
    if path.strategy == "exchange":
        feed = exchange_plan_feed(plan, ctx, source, path, sorted(reused))
    else:
        reader, tensors = source.reader(), [s.tensor for s in steps]
        feed = lambda failed: read_feed(tensors, reader, path.read_batch_bytes, failed)  # noqa: E731
    written: dict[str, WrittenFile] = {}
    meter = progress if progress is not None else Meter()
    meter.update(sum(f.nbytes for f in files if f.filename in reused))
    writers = LaneWriters(todo, directory, meter, written, progress_dir, plan.metadata)
    # in flight: the batch being read, and up to one batch of read or transformed tensors (overlap.py)
    Stages(steps, path.read_batch_bytes, ctx.device).run(
        metered(feed, meter), lambda inputs, t, start: timed_transform(inputs, t, ctx, meter, start), writers.write_lane
    )
    done = [reused.get(f.filename) or written[f.filename] for f in files]
    log.debug("wrote %d file(s)", len(done))
    return done


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
    whole = lambda: split_schedule(exchange_schedule(plan, source, path, skipped), plan.world_size)  # noqa: E731
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
    """The exchange schedule for every rank's files in feed order, less the files each rank reuses; with `rank`,
    only that rank's own transfers are kept. Pure."""
    needs, order = {}, partial(write_order, metadata=plan.metadata)
    for writer in range(plan.world_size):
        todo = [f for f in plan.files_for(writer) if skipped is None or f.filename not in skipped[writer]]
        needs[writer] = [s.tensor for s in lane_order(todo, path.write_threads, order)]
    return plan_exchange(needs, source.chunks(), plan.world_size, path.read_batch_bytes, rank)


def split_schedule(schedule: ExchangeSchedule, world_size: int) -> list[ExchangeSchedule]:
    """Each rank's part of a whole schedule, in one pass: every round (the same count for all), with only the
    transfers that rank sends or receives and the tensors it writes, and the files it reads. Pure."""
    rounds: list[list[Round]] = [[] for _ in range(world_size)]
    for rnd in schedule.rounds:
        moves: list[list[Transfer]] = [[] for _ in range(world_size)]
        held: list[list[tuple[int, TensorPlan]]] = [[] for _ in range(world_size)]
        for t in rnd.transfers:
            moves[t.src].append(t)
            if t.dst != t.src:
                moves[t.dst].append(t)
        for writer, tensor in rnd.tensors:
            held[writer].append((writer, tensor))
        for rank in range(world_size):
            rounds[rank].append(replace(rnd, transfers=tuple(moves[rank]), tensors=tuple(held[rank])))
    readers: list[dict[str, int]] = [{} for _ in range(world_size)]
    for file, rank in schedule.readers.items():
        readers[rank][file] = rank
    return [replace(schedule, rounds=tuple(rounds[r]), readers=readers[r]) for r in range(world_size)]


def relink(schedule: ExchangeSchedule, plan: Plan, rank: int) -> ExchangeSchedule:
    """`schedule` (this rank's part, received as a copy) holding this rank's own TensorPlan objects, by name: the
    write pipeline follows its tensors by identity. Pure."""
    mine = {t.name: t for f in plan.files_for(rank) for t in f.tensors}
    rounds = (replace(r, tensors=tuple((w, mine[t.name]) for w, t in r.tensors)) for r in schedule.rounds)
    return replace(schedule, rounds=tuple(rounds))


def write_order(file: FilePlan, metadata: Mapping[str, str] | None = None) -> list[TensorPlan]:
    """A file's tensors in the order their bytes sit in it (so its sha256 is computed while writing)."""
    slots = file_layout(file, metadata).slots
    return sorted(file.tensors, key=lambda t: min(slots[name].start for name in t.outputs))


def file_layout(file: FilePlan, metadata: Mapping[str, str] | None = None) -> FileLayout:
    """The file's safetensors layout; `metadata` (a recipe's, e.g. torchao's) joins the header's {"format": "pt"}.

    A file without quantized weights is laid out as the safetensors library lays it out (byte-identical to
    save_file's). A file with quantized weights keeps each weight's outputs together, in the recipe's order
    (the quantized data, then its scales), the weights in the plan's order: the library's order would put every
    float32 scale before all the data, so no weight could be written (and hashed, and sent past the page cache)
    before the last one was quantized. Loaders find tensors by the header's offsets, whatever their order; when
    that order would leave a tensor misaligned for its dtype, the library's is used.
    """
    tensors = [(name, shape, dtype) for t in file.tensors for name, (shape, dtype) in t.outputs.items()]
    header = {**DEFAULT_METADATA, **(metadata or {})}
    if any(t.quant is not None for t in file.tensors):
        grouped = layout(tensors, header, as_given=True)
        if aligned(grouped):
            return grouped
    return layout(tensors, header)


class LaneWriters:
    """Writes the items of each lane into their files, one file at a time per lane. Runs on: writer threads."""

    def __init__(
        self,
        files: Sequence[FilePlan],
        directory: Path,
        bar: Meter,
        written: dict[str, WrittenFile],
        progress_dir: Path | None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.files, self.directory, self.bar, self.written = files, directory, bar, written
        self.progress_dir, self.metadata = progress_dir, metadata

    def write_lane(self, lane: int, items: Iterator[Item]) -> None:
        writer, left, current = None, 0, -1
        stage = StageBuffer()
        try:
            for item in items:
                if item.step.file != current:
                    current, file = item.step.file, self.files[item.step.file]
                    writer, left = self._open(file, stage), len(file.tensors)
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

    def _open(self, file: FilePlan, stage: StageBuffer) -> SafetensorsWriter:
        try:
            return SafetensorsWriter(self.directory / file.filename, file_layout(file, self.metadata), stage)
        except OSError as exc:
            raise self._error(file, exc) from exc

    def _close(self, file: FilePlan, writer: SafetensorsWriter) -> None:
        path = self.directory / file.filename
        digest = writer.close()
        finished = WrittenFile(file.filename, file.rank, os.path.getsize(path), len(file.tensors), digest)
        if self.progress_dir is not None:
            record_progress(self.progress_dir, finished)
        self.written[file.filename] = finished

    def _error(self, file: FilePlan, exc: OSError) -> DestinationError:
        return DestinationError(
            f"cannot write {file.filename}",
            where=self.directory,
            hint=f"{exc.strerror or exc}; free space or choose another DEST",
        )


def record_progress(progress_dir: Path, written: WrittenFile) -> None:
    """Atomically record a finished file (written after the file itself was fsynced)."""
    tmp = progress_dir / f"{written.filename}.json.tmp"
    tmp.write_text(json.dumps(asdict(written)))
    os.replace(tmp, progress_dir / f"{written.filename}.json")


def reusable(file: FilePlan, directory: Path, progress_dir: Path | None) -> WrittenFile | None:
    """The record of a file an interrupted run finished, when the file on disk still matches it."""
    if progress_dir is None:
        return None
    record_path, path = progress_dir / f"{file.filename}.json", directory / file.filename
    try:
        record = WrittenFile(**json.loads(record_path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
    if not path.is_file() or path.stat().st_size != record.size or record.tensors != len(file.tensors):
        return None
    if file_sha256(path) != record.sha256:
        log.warning("resume: %s does not match its record; writing it again", file.filename)
        return None
    return WrittenFile(record.filename, file.rank, record.size, record.tensors, record.sha256, reused=True)
