"""The overlapped pipeline of one rank: feed -> transform -> write, each stage busy at once.

- a feed thread reads (or exchanges) the next tensors;
- the calling thread transforms the current ones on the device and starts their device-to-host copy into
  pinned buffers (CUDA) without waiting for it;
- `lanes` writer threads write the previous ones, each into its own output file, hashing as they go.

Bytes in flight stay within a budget, counted as they are held: a source tensor from the moment the feed hands
it over until it is transformed, then its outputs until they are on disk (a recipe's slow transform and a slow
disk then hold the same memory). A tensor bigger than the budget travels alone, or in blocks of rows when the
feed gives it so. The first error in any stage stops
all of them and is raised by `run`; the feed is told (`failed`) so that an exchange tells the other ranks.
Runs on: every rank, for its own files.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from distfinalize.plan import FilePlan, TensorPlan

DONE = object()


@dataclass(frozen=True)
class Step:
    """One tensor in feed order: which lane (writer thread) writes it, into which of the rank's files."""

    lane: int
    file: int  # index into the rank's files (or pieces of files)
    tensor: TensorPlan
    rows: tuple[int, int] | None = None  # the rows [start, stop) this rank writes of a tensor cut between ranks

    @property
    def end_row(self) -> int:
        """The row after the last one this step holds."""
        return self.rows[1] if self.rows is not None else (self.tensor.shape[0] if self.tensor.shape else 1)


def lane_order(files: Sequence[FilePlan], lanes: int, order: Callable[[FilePlan], list[TensorPlan]]) -> list[Step]:
    """The feed order: up to `lanes` files open at once, their tensors interleaved, each file in its write order.

    A lane takes the next file when its file is done. Pure; every rank computes every rank's order alike.
    """
    pending = list(enumerate(files))
    open_files: list[tuple[int, list[TensorPlan]] | None] = [None] * max(1, lanes)
    steps: list[Step] = []
    while True:
        for lane in range(len(open_files)):
            if open_files[lane] is None and pending:
                index, file = pending.pop(0)
                open_files[lane] = (index, order(file))
        if all(f is None for f in open_files):
            return steps
        for lane, current in enumerate(open_files):
            if current is None:
                continue
            index, tensors = current
            steps.append(Step(lane, index, tensors.pop(0)))
            if not tensors:
                open_files[lane] = None


class ByteBudget:
    """A counting limit on bytes in flight; `abort` wakes every waiter for good."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.aborted = False
        self.cond = threading.Condition()

    def acquire(self, nbytes: int) -> bool:
        """Wait until `nbytes` fit (or nothing else is in flight). False once aborted."""
        with self.cond:
            while not self.aborted and self.used and self.used + nbytes > self.limit:
                self.cond.wait()
            if self.aborted:
                return False
            self.used += nbytes
            return True

    def release(self, nbytes: int) -> None:
        with self.cond:
            self.used -= nbytes
            self.cond.notify_all()

    def swap(self, released: int, taken: int) -> None:
        """Exchange `released` bytes for `taken` ones at once, without waiting (the transform stage, trading a
        source tensor for its outputs, must never wait on the stages it feeds)."""
        with self.cond:
            self.used += taken - released
            self.cond.notify_all()

    def abort(self) -> None:
        with self.cond:
            self.aborted = True
            self.cond.notify_all()


def in_flight(t: TensorPlan) -> int:
    """Bytes a tensor holds between the feed and the disk: its source tensor and its outputs."""
    return t.source_nbytes + t.nbytes


def source_share(t: TensorPlan, rows: tuple[int, int] | None) -> int:
    """Source bytes of a whole tensor, or of a block of its rows (its share, at least 1)."""
    if rows is None:
        return t.source_nbytes
    return max(1, t.source_nbytes * (rows[1] - rows[0]) // t.shape[0])


def held_bytes(outputs: dict[str, torch.Tensor]) -> int:
    return sum(o.numel() * o.element_size() for o in outputs.values())


@dataclass
class Item:
    """A transformed tensor, or a block of its rows, on its way to a writer thread."""

    step: Step
    outputs: dict[str, torch.Tensor]
    copied: torch.cuda.Event | None  # the device-to-host copy to wait for, on CUDA
    rows: tuple[int, int] | None = None  # the block of rows, when the tensor comes in blocks
    charged: int = 0  # bytes it holds of the budget

    @property
    def last(self) -> bool:
        """Whether it completes its tensor."""
        return self.rows is None or self.rows[1] == self.step.end_row


class Stages:
    """Runs feed, transform and writers for one rank's steps; the first error wins. Runs on: each rank."""

    def __init__(self, steps: Sequence[Step], budget: int, device: torch.device) -> None:
        self.steps = steps
        self.budget = ByteBudget(budget)
        self.device = device
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        self.fed: queue.Queue = queue.Queue()
        self.lanes = [queue.Queue() for _ in range(1 + max((s.lane for s in steps), default=0))]

    def failed(self) -> BaseException | None:
        return self.error

    def fail(self, exc: BaseException) -> None:
        with self.lock:
            if self.error is None:
                self.error = exc
        self.budget.abort()
        self.fed.put(DONE)

    def run(
        self,
        feed: Callable[[Callable[[], BaseException | None]], Iterator[tuple]],
        transform: Callable[[tuple[torch.Tensor, ...], TensorPlan, int | None], dict[str, torch.Tensor]],
        write: Callable[[int, Iterator[Item]], None],
    ) -> None:
        """Feed in a thread, transform here, `write(lane, items)` in one thread per lane; raise the first error.

        The feed yields (tensor plan, inputs) per tensor, or (tensor plan, inputs, (start, stop)) per block of a
        tensor's rows, in order; `transform(inputs, tensor plan, start row or None)`."""
        threads = [threading.Thread(target=self._feed, args=(feed,), name="distfinalize-feed", daemon=True)]
        threads += [
            threading.Thread(target=self._write, args=(write, lane), name=f"distfinalize-write{lane}", daemon=True)
            for lane in range(len(self.lanes))
        ]
        for thread in threads:
            thread.start()
        try:
            self._transform(transform)
        except BaseException as exc:  # KeyboardInterrupt too: every stage must stop
            self.fail(exc)
        finally:
            for lane in self.lanes:
                lane.put(DONE)
            for thread in threads:
                thread.join()
        if self.error is not None:
            raise self.error

    def _feed(self, feed) -> None:
        steps = iter(self.steps)
        try:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)  # the current device is per thread
            step, complete = None, True
            for got in feed(self.failed):
                t, inputs, rows = got if len(got) == 3 else (*got, None)
                if complete:
                    step = next(steps)
                complete = rows is None or rows[1] == step.end_row
                if step.tensor is not t:
                    raise RuntimeError(f"feed out of order: got {t.name}, expected {step.tensor.name}")
                charge = source_share(t, rows)
                if self.error is not None or not self.budget.acquire(charge):
                    continue  # keep an exchange going until it tells the other ranks at its next round
                self.fed.put((step, inputs, rows, charge))
        except BaseException as exc:
            self.fail(exc)
        self.fed.put(DONE)

    def _transform(self, transform) -> None:
        while (got := self.fed.get()) is not DONE and self.error is None:
            step, inputs, rows, charge = got
            outputs = transform(inputs, step.tensor, None if rows is None else rows[0])
            del inputs
            copied = None
            if self.device.type == "cuda":
                outputs, copied = to_pinned(outputs)
            held = held_bytes(outputs)
            self.budget.swap(charge, held)  # the source is gone; its outputs wait for the writer
            self.lanes[step.lane].put(Item(step, outputs, copied, rows, held))

    def _write(self, write, lane: int) -> None:
        try:
            write(lane, self._items(lane))
        except BaseException as exc:
            self.fail(exc)

    def _items(self, lane: int) -> Iterator[Item]:
        while (item := self.lanes[lane].get()) is not DONE and self.error is None:
            if item.copied is not None:
                item.copied.synchronize()
            yield item
            self.budget.release(item.charged)


def to_pinned(outputs: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.cuda.Event]:
    """Start copying device tensors into pinned host buffers; the event marks when they are there."""
    host = {}
    for name, t in outputs.items():
        host[name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host[name].copy_(t, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event
