"""Feeds: where a rank's source tensors come from, in its write order, one (TensorPlan, inputs) at a time: the
source tensor, then any LoRA factors merged into it (TensorPlan.source_keys).

- `read_feed` (`--strategy read`): the rank reads the byte ranges of its own tensors, a batch at a time.
- `exchange_feed` (`--strategy exchange`): the rank reads the chunks the schedule gives it, and every rank
  swaps chunks in one all-to-all per round (NCCL on CUDA tensors, gloo on CPU ones). Each round starts by
  agreeing that every rank read (and verified) its chunks, so a failure anywhere stops every rank at once. A
  tensor larger than a round comes in blocks of rows over several rounds (exchange.py), yielded as `read_feed`
  yields its blocks; a rank holds its send buffer and its receive buffer (each at most a round's budget, half
  of `--read-batch`, unless one block of rows cannot be smaller) beside the pipeline's own bytes in flight, and
  the one stored chunk larger than a round it may be sending in slices (read whole, to verify it).

A feed stops early when `failed()` returns an error raised elsewhere in this rank's pipeline; the exchange
feed reports it to the other ranks at the next round. Runs on: every rank (the exchange feed on all at once).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Container, Iterator, Sequence
from typing import TypeVar

import torch

from distfinalize.dist.context import DistContext
from distfinalize.dist.group import wire_device
from distfinalize.plan import TensorPlan
from distfinalize.sources import SourceChunk, TensorReader
from distfinalize.transform.cast import row_group
from distfinalize.write.blocks import row_blocks
from distfinalize.write.exchange import ExchangeSchedule, Round, Transfer

log = logging.getLogger(__name__)
T = TypeVar("T")
Failed = Callable[[], BaseException | None]
CHUNK_BLOCK_BYTES = 2**19  # see chunk_blocks: below this, the per-block work outweighs the copy saved
Feed = Iterator[tuple]  # (TensorPlan, inputs) for a whole tensor; (TensorPlan, inputs, (start, stop)) for rows


def source_nbytes(t: TensorPlan) -> int:
    return t.source_nbytes


def read_batches(items: Sequence[T], limit: int, size_of: Callable[[T], int] = source_nbytes) -> Iterator[list[T]]:
    """Consecutive groups of items whose bytes (source bytes of tensors) stay within `limit` (a bigger one alone)."""
    batch: list[T] = []
    size = 0
    for t in items:
        nbytes = size_of(t)
        if batch and size + nbytes > limit:
            yield batch
            batch, size = [], 0
        batch.append(t)
        size += nbytes
    if batch:
        yield batch


def read_feed(tensors: Sequence[TensorPlan], reader: TensorReader, batch_bytes: int, failed: Failed) -> Feed:
    """This rank's tensors read by itself, in order, `batch_bytes` of source data at a time. A tensor larger than
    that comes in blocks of rows (`row_blocks`), each as (tensor, (rows,), (start, stop)), when its transform
    allows (transform.cast.row_group); so does a tensor stored in large chunks of whole rows (`chunk_blocks`).
    Runs on: each rank."""
    for batch in read_batches(tensors, batch_bytes):
        if failed() is not None:
            return
        t = batch[0]
        if len(batch) == 1 and t.source_nbytes > batch_bytes and t.shape[0] > 1 and (group := row_group(t)):
            rows = t.shape[0]
            cuts = reader.row_cuts(t.source_key)
            blocks = chunk_blocks(t, cuts) or row_blocks(rows, t.source_nbytes // rows, batch_bytes, group, cuts)
            for start, stop in blocks:
                if failed() is not None:
                    return
                yield t, (reader.read_rows(t.source_key, start, stop),), (start, stop)
            continue
        blocks = {t.name: b for t in batch if (b := chunk_blocks(t, reader.row_cuts(t.source_key)))}
        data = reader.read([key for t in batch if t.name not in blocks for key in t.source_keys])
        for t in batch:
            if t.name not in blocks:
                yield t, tuple(data.pop(key) for key in t.source_keys)
                continue
            for start, stop in blocks[t.name]:
                if failed() is not None:
                    return
                yield t, (reader.read_rows(t.source_key, start, stop),), (start, stop)


def chunk_blocks(t: TensorPlan, cuts: Sequence[int] | None) -> list[tuple[int, int]] | None:
    """The blocks of rows, one per stored chunk, in which a tensor only cast goes through when it is stored in
    chunks of whole rows of at least CHUNK_BLOCK_BYTES on average: each block is the chunk as read, so the tensor
    is never put together in memory. None: read it whole. `cuts`: the reader's `row_cuts`. Pure."""
    if t.quant is not None or row_group(t) != 1 or t.shape[0] < 2:
        return None
    if cuts is None or len(cuts) < 2 or t.source_nbytes < CHUNK_BLOCK_BYTES * len(cuts):
        return None
    return row_blocks(t.shape[0], t.source_nbytes // t.shape[0], 1, 1, cuts)


def exchange_feed(schedule: ExchangeSchedule, ctx: DistContext, reader, failed: Failed) -> Feed:
    """This rank's tensors, delivered round by round over the process group. Runs on: all ranks together.

    `reader` must have `load_chunks` (DcpTensorReader). The chunks are verified where they are read, whole; a
    chunk larger than the round budget is sent in slices of rows over several rounds and held here from its first
    slice for a receiver until its last (`lasts`; the schedule has a rank slice one such chunk at a time); other
    chunks sent in slices in several rounds are read again.
    """
    wire = wire_device(ctx.device)
    held = {"sent": 0, "received": 0, "piece": 0, "chunks": 0}  # the largest of each this rank held (logged)
    lasts = last_sends(schedule, ctx.rank)
    kept: dict[SourceChunk, torch.Tensor] = {}
    for number, rnd in enumerate(schedule.rounds, start=1):
        sends = rnd.sent_by(ctx.rank)
        packed: list[torch.Tensor] = []
        keep = {c for (c, _), (first, last) in lasts.items() if first <= number < last}

        def read_mine(sends: tuple[Transfer, ...] = sends, packed: list[torch.Tensor] = packed, keep: set = keep):
            error = failed()
            if error is not None:
                raise error
            packed.append(pack(reader, sends, wire, kept, keep))

        ctx.run_step(f"exchange round {number} of {len(schedule.rounds)}", read_mine)
        held["chunks"] = max(held["chunks"], sum(c.nbytes for c in kept))
        receives = rnd.received_by(ctx.rank)
        received = ctx.all_to_all_bytes(
            packed[0],
            rnd.split(sends, ctx.world_size, "dst"),
            rnd.split(receives, ctx.world_size, "src"),
            step=f"exchange round {number}",
        )
        held["sent"], held["received"] = max(held["sent"], packed[0].numel()), max(held["received"], received.numel())
        del packed[:]
        for got in assemble(rnd, ctx.rank, receives, received, wire):
            held["piece"] = max(held["piece"], got[1][0].nbytes)
            yield got
        del received  # the next round's send and receive buffers take its place
    log.debug("exchange: largest buffers held: %s bytes (round budget %d)", held, schedule.budget)


def last_sends(schedule: ExchangeSchedule, rank: int) -> dict[tuple[SourceChunk, int], tuple[int, int]]:
    """The chunks larger than the round budget that `rank` sends in slices of rows, per receiver: the first and
    last round (from 1) that sends it one of their rows. Pure."""
    runs: dict[tuple[SourceChunk, int], tuple[int, int]] = {}
    for number, rnd in enumerate(schedule.rounds, start=1):
        for t in rnd.transfers:
            if t.src == rank and t.rows is not None and t.chunk.nbytes > schedule.budget:
                runs[t.chunk, t.dst] = (runs.get((t.chunk, t.dst), (number,))[0], number)
    return runs


def pack(reader, sends: Sequence[Transfer], device: torch.device, kept: dict, keep: Container) -> torch.Tensor:
    """The rows each transfer carries, as one flat byte buffer in `sends` order: each chunk read (and verified)
    whole, or taken from `kept`, and its rows copied in: one chunk is read at a time beside the buffer, and `kept`
    keeps those in `keep` (needed later) and lets go of the others before it reads; pinned and sent to the GPU
    when the wire is NCCL."""
    starts = list(itertools.accumulate((t.nbytes for t in sends), initial=0))
    buffer = torch.empty(starts[-1], dtype=torch.uint8, pin_memory=device.type == "cuda")
    uses: dict[SourceChunk, list[int]] = {}
    for number, t in enumerate(sends):
        uses.setdefault(t.chunk, []).append(number)

    def place(chunk: SourceChunk, data: torch.Tensor) -> None:
        for number in uses[chunk]:
            rows = sends[number].rows
            part = data if rows is None else data.narrow(0, rows[0] - chunk.offsets[0], rows[1] - rows[0])
            buffer[starts[number] : starts[number + 1]].copy_(part.reshape(-1).view(torch.uint8))

    wanted = [c for c in uses if c not in kept]
    for chunk in [c for c in uses if c in kept]:
        place(chunk, kept[chunk])
    for chunk in [c for c in kept if c not in keep]:  # done with: let go before the next is read
        del kept[chunk]
    for number, data in reader.load_chunks(wanted):
        place(wanted[number], data)
        if wanted[number] in keep:
            kept[wanted[number]] = data
    if device.type == "cuda":
        return buffer.to(device, non_blocking=True)
    return buffer


def assemble(rnd: Round, rank: int, receives: Sequence[Transfer], buffer: torch.Tensor, device: torch.device) -> Feed:
    """The tensors, or blocks of a tensor's rows, this rank holds after a round, put together from the received
    rows of chunks in write order: (tensor, (data,)) for a whole tensor, (tensor, (rows,), (start, stop)) for a
    block."""
    pieces: dict[str, list[tuple[Transfer, torch.Tensor]]] = {}
    start = 0
    for move in receives:
        pieces.setdefault(move.chunk.key, []).append((move, buffer[start : start + move.nbytes]))
        start += move.nbytes
    for piece in rnd.pieces_for(rank):
        t, first = piece.tensor, 0 if piece.rows is None else piece.rows[0]
        shape = list(t.source_shape or t.shape)
        if piece.rows is not None:
            shape[0] = piece.rows[1] - piece.rows[0]
        tensor = torch.empty(shape, dtype=t.source_dtype, device=device)
        for move, data in pieces.get(t.source_key, []):
            if not piece.holds(move):
                continue
            if data.storage_offset() % t.source_dtype.itemsize:
                data = data.clone()  # a view as a wider dtype needs an aligned start
            chunk, span, sizes = move.chunk, move.span, list(move.chunk.sizes)
            target = tensor
            if span is not None:
                sizes[0] = span[1] - span[0]
                target = target.narrow(0, span[0] - first, sizes[0])
            for dim, (offset, size) in enumerate(zip(chunk.offsets[1:], sizes[1:], strict=True), start=1):
                target = target.narrow(dim, offset, size)
            target.copy_(data.view(t.source_dtype).reshape(sizes))
        if piece.rows is None:
            yield t, (tensor,)
        else:
            yield t, (tensor,), piece.rows
