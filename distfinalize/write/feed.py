"""Feeds: where a rank's source tensors come from, in its write order, one (TensorPlan, inputs) at a time: the
source tensor, then any LoRA factors merged into it (TensorPlan.source_keys).

- `read_feed` (`--strategy read`): the rank reads the byte ranges of its own tensors, a batch at a time.
- `exchange_feed` (`--strategy exchange`): the rank reads the chunks the schedule gives it, and every rank
  swaps chunks in one all-to-all per round (NCCL on CUDA tensors, gloo on CPU ones). Each round starts by
  agreeing that every rank read (and verified) its chunks, so a failure anywhere stops every rank at once.

A feed stops early when `failed()` returns an error raised elsewhere in this rank's pipeline; the exchange
feed reports it to the other ranks at the next round. Runs on: every rank (the exchange feed on all at once).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch

from distfinalize.dist.context import DistContext
from distfinalize.dist.group import wire_device
from distfinalize.plan import TensorPlan
from distfinalize.sources import SourceChunk, TensorReader
from distfinalize.transform.cast import row_group
from distfinalize.write.exchange import ExchangeSchedule, Round, Transfer

T = TypeVar("T")
Failed = Callable[[], BaseException | None]
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
    allows (transform.cast.row_group). Runs on: each rank."""
    for batch in read_batches(tensors, batch_bytes):
        if failed() is not None:
            return
        t = batch[0]
        if len(batch) == 1 and t.source_nbytes > batch_bytes and t.shape[0] > 1 and (group := row_group(t)):
            rows = t.shape[0]
            for start, stop in row_blocks(
                rows, t.source_nbytes // rows, batch_bytes, group, reader.row_cuts(t.source_key)
            ):
                if failed() is not None:
                    return
                yield t, (reader.read_rows(t.source_key, start, stop),), (start, stop)
            continue
        data = reader.read([key for t in batch for key in t.source_keys])
        for t in batch:
            yield t, tuple(data.pop(key) for key in t.source_keys)


def row_blocks(rows: int, row_bytes: int, limit: int, group: int, cuts: Sequence[int] | None) -> list[tuple[int, int]]:
    """A tensor's rows in blocks [start, stop) of at most `limit` bytes, each ending on a multiple of `group` rows
    (or the last row) and, when `cuts` are given (the rows where the source's stored chunks start, which are read
    whole), on a cut. A block that cannot be smaller goes alone, bigger. Pure."""
    ends = range(1, rows + 1) if cuts is None else sorted({c for c in cuts if 0 < c < rows} | {rows})
    ends = [e for e in ends if e % group == 0 or e == rows]
    per = max(1, limit // max(1, row_bytes))
    blocks, start, i = [], 0, 0
    while start < rows:
        j = bisect.bisect_right(ends, start + per) - 1  # the last end within the limit
        stop = ends[j] if j >= i and ends[j] > start else ends[i]
        blocks.append((start, stop))
        start = stop
        i = bisect.bisect_right(ends, start)
    return blocks


def exchange_feed(schedule: ExchangeSchedule, ctx: DistContext, reader, failed: Failed) -> Feed:
    """This rank's tensors, delivered round by round over the process group. Runs on: all ranks together.

    `reader` must have `load_chunks` (DcpTensorReader). The chunks are verified where they are read.
    """
    wire = wire_device(ctx.device)
    for number, rnd in enumerate(schedule.rounds, start=1):
        sends = rnd.sent_by(ctx.rank)
        packed: list[torch.Tensor] = []

        def read_mine(sends: tuple[Transfer, ...] = sends, packed: list[torch.Tensor] = packed) -> None:
            error = failed()
            if error is not None:
                raise error
            packed.append(pack(reader, [t.chunk for t in sends], wire))

        ctx.run_step(f"exchange round {number} of {len(schedule.rounds)}", read_mine)
        receives = rnd.received_by(ctx.rank)
        received = ctx.all_to_all_bytes(
            packed[0],
            rnd.split(sends, ctx.world_size, "dst"),
            rnd.split(receives, ctx.world_size, "src"),
            step=f"exchange round {number}",
        )
        del packed[:]
        yield from assemble(rnd, ctx.rank, receives, received, wire)


def pack(reader, chunks: Sequence[SourceChunk], device: torch.device) -> torch.Tensor:
    """The chunks, read and verified, as one flat byte buffer, each copied in as it is read (so one chunk is held
    beside the buffer); pinned and sent to the GPU when the wire is NCCL."""
    starts = list(itertools.accumulate((c.nbytes for c in chunks), initial=0))
    buffer = torch.empty(starts[-1], dtype=torch.uint8, pin_memory=device.type == "cuda")
    for number, data in reader.load_chunks(chunks):
        buffer[starts[number] : starts[number + 1]].copy_(data.reshape(-1).view(torch.uint8))
    if device.type == "cuda":
        return buffer.to(device, non_blocking=True)
    return buffer


def assemble(rnd: Round, rank: int, receives: Sequence[Transfer], buffer: torch.Tensor, device: torch.device) -> Feed:
    """The whole tensors this rank holds after a round, put together from the received chunks, in write order."""
    pieces: dict[str, list[tuple[Transfer, torch.Tensor]]] = {}
    start = 0
    for move in receives:
        pieces.setdefault(move.chunk.key, []).append((move, buffer[start : start + move.chunk.nbytes]))
        start += move.chunk.nbytes
    for t in rnd.tensors_for(rank):
        tensor = torch.empty(t.source_shape or t.shape, dtype=t.source_dtype, device=device)
        for move, data in pieces.get(t.source_key, []):
            chunk = move.chunk
            if data.storage_offset() % t.source_dtype.itemsize:
                data = data.clone()  # a view as a wider dtype needs an aligned start
            target = tensor
            for dim, (offset, size) in enumerate(zip(chunk.offsets, chunk.sizes, strict=True)):
                target = target.narrow(dim, offset, size)
            target.copy_(data.view(t.source_dtype).reshape(chunk.sizes))
        yield t, (tensor,)
