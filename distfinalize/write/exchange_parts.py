"""The stored chunks of a tensor, and the (chunk, rows) parts of the blocks of rows it moves in, for exchange.py.

A tensor's chunks are kept as columns (the chunks sorted by first row, their readers, bytes, first rows), so the
schedule of a checkpoint saved by thousands of ranks (millions of chunks) takes each block's chunks as one slice
where the block holds them whole, which is how a row-sharded save lies: Python code runs per block, and per chunk
only for the chunks a block boundary cuts. Pure. Runs on: rank 0 (the whole schedule), or any rank for its own part.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import compress, islice, repeat
from operator import add, itemgetter, lt, sub

from distfinalize.plan import TensorPlan
from distfinalize.sources import SourceChunk
from distfinalize.transform.cast import row_group
from distfinalize.write.blocks import row_blocks

_FIELD = {name: itemgetter(i) for i, name in enumerate(SourceChunk._fields)}
_FILE, _OFFSETS, _SIZES, _NBYTES = (_FIELD[f] for f in ("file", "offsets", "sizes", "nbytes"))
_FIRST = itemgetter(0)


@dataclass(frozen=True)
class Parts:
    """The (chunk, rows) parts of one piece, as columns: rows None where the whole chunk moves, else the tensor's
    rows [start, stop) of it; the rank that reads each chunk, and the bytes it sends of it."""

    chunks: tuple[SourceChunk, ...]
    rows: tuple[tuple[int, int] | None, ...]
    readers: tuple[int, ...]
    nbytes: tuple[int, ...]

    def slices(self) -> dict[int, int]:
        """The bytes each reading rank sends of the piece (readers in order of first part)."""
        slices = dict(zip(self.readers, self.nbytes, strict=True))
        if len(slices) < len(self.readers):  # a reader of several parts: add them up
            slices = dict.fromkeys(self.readers, 0)
            for reader, n in zip(self.readers, self.nbytes, strict=True):
                slices[reader] += n
        return slices

    def sliced(self, budget: int) -> tuple[SourceChunk, ...]:
        """The chunks larger than `budget` of which this piece carries a slice of rows (in part order)."""
        if not any(self.rows):
            return ()
        return tuple(
            c for c, rows in zip(self.chunks, self.rows, strict=True) if rows is not None and c.nbytes > budget
        )


@dataclass(frozen=True)
class Stored:
    """A tensor's stored chunks sorted by first row (a 0-d tensor's as they are) as columns: the chunks, their
    readers, bytes, first rows and row ends, the indices of those larger than the budget, the most rows one
    holds, whether each holds a row, and their bytes."""

    chunks: tuple[SourceChunk, ...]
    readers: tuple[int, ...]
    sizes: tuple[int, ...]
    starts: tuple[int, ...]
    ends: tuple[int, ...]
    big: tuple[int, ...]
    longest: int
    solid: bool
    nbytes: int

    @classmethod
    def of(cls, chunks: Sequence[SourceChunk], readers: Mapping[str, int], budget: int) -> Stored:
        ordered, starts = tuple(chunks), ()
        if ordered and ordered[0].offsets:
            starts = tuple(map(_FIRST, map(_OFFSETS, ordered)))
            if not all(map(lt, starts, islice(starts, 1, None))):  # not in row order already: sort
                ordered = tuple(sorted(ordered, key=_OFFSETS))
                starts = tuple(map(_FIRST, map(_OFFSETS, ordered)))
        sizes = tuple(map(_NBYTES, ordered))
        reading = tuple(map(readers.__getitem__, map(_FILE, ordered)))
        big = tuple(compress(range(len(sizes)), map(budget.__lt__, sizes))) if max(sizes, default=0) > budget else ()
        if not starts:
            return cls(ordered, reading, sizes, (), (), big, 1, True, sum(sizes))
        rows = list(map(_FIRST, map(_SIZES, ordered)))
        ends = tuple(map(add, starts, rows))
        return cls(ordered, reading, sizes, starts, ends, big, max(rows), min(rows) > 0, sum(sizes))

    def overlapping(self, span: tuple[int, int]) -> list[int]:
        """The indices of the chunks holding rows of `span`, found by bisection."""
        lo = bisect.bisect_left(self.starts, span[0] - self.longest + 1)
        return [i for i in range(lo, bisect.bisect_left(self.starts, span[1])) if self.ends[i] > span[0]]

    def whole(self, span: tuple[int, int] | None) -> Parts:
        """The chunks holding rows of `span` (None: all), each moving whole."""
        if span is None or not self.starts:
            return Parts(self.chunks, (None,) * len(self.chunks), self.readers, self.sizes)
        return self._clip(self.overlapping(span), None)

    def parts(self, blocks: Sequence[tuple[int, int]]) -> list[Parts]:
        """The parts of each block of rows (contiguous, in row order): the rows of every chunk that fall in it, in
        chunk order, rows None when the whole chunk does. The chunks that start in a block and end in it are a
        slice of the columns; only those that cross an end of the block are cut, one by one."""
        out = []
        starts, ends = self.starts, self.ends
        for first, last in blocks:
            lo, hi = bisect.bisect_left(starts, first), bisect.bisect_left(starts, last)
            head = range(bisect.bisect_left(starts, first - self.longest + 1), lo)  # starting before the block
            if head and max(ends[head.start : lo]) <= first:
                head = range(0)
            cut = lo  # from here on, the chunks that start in the block, cut where one does not end in it
            if self.solid and hi > lo:
                cut = hi if max(ends[lo:hi]) <= last else next(compress(range(lo, hi), map(last.__lt__, ends[lo:hi])))
            if not head and cut == hi:
                out.append(Parts(self.chunks[lo:hi], (None,) * (hi - lo), self.readers[lo:hi], self.sizes[lo:hi]))
                continue
            if cut - lo < 64:  # few chunks: cut them one by one
                out.append(self._clip(range(head.start if head else lo, hi), (first, last)))
                continue
            before, after = self._clip(head, (first, last)), self._clip(range(cut, hi), (first, last))
            out.append(
                Parts(
                    (*before.chunks, *self.chunks[lo:cut], *after.chunks),
                    (*before.rows, *(None,) * (cut - lo), *after.rows),
                    (*before.readers, *self.readers[lo:cut], *after.readers),
                    (*before.nbytes, *self.sizes[lo:cut], *after.nbytes),
                )
            )
        return out

    def _clip(self, indices: Iterable[int], block: tuple[int, int] | None) -> Parts:
        """The parts of the chunks at `indices` that hold rows of `block` (None: each whole)."""
        chunks, rows, readers, nbytes = [], [], [], []
        for i in indices:
            c = self.chunks[i]
            part = None
            if block is not None:
                lo, hi = self.starts[i], self.ends[i]
                a, b = max(lo, block[0]), min(hi, block[1])
                if a >= b:
                    continue
                part = None if a == lo and b == hi else (a, b)
            chunks.append(c)
            rows.append(part)
            readers.append(self.readers[i])
            nbytes.append(c.nbytes if part is None else c.nbytes // c.sizes[0] * (part[1] - part[0]))
        return Parts(tuple(chunks), tuple(rows), tuple(readers), tuple(nbytes))


def piece_rows(
    t: TensorPlan, span: tuple[int, int] | None, stored: Stored, budget: int
) -> list[tuple[int, int]] | None:
    """The blocks of source rows a writer's step moves in: None when it moves whole (a whole tensor that fits the
    budget, or whose transform needs it whole), else blocks covering `span` (the rows the plan gives this rank;
    None: all of them) on the recipe's row group, ending where stored chunks start and every `budget` bytes inside
    a chunk larger than the budget. Pure."""
    shape = t.source_shape or t.shape
    if len(shape) < 1 or shape[0] < 1:
        return None
    nbytes = stored.nbytes
    whole = span is None
    if span is None:
        if nbytes <= budget or shape[0] < 2 or not (group := row_group(t)):
            return None
        span = (0, shape[0])
    else:
        group = 1  # the plan cuts only tensors cast row by row
    row_bytes = max(1, nbytes // shape[0])
    per = max(group, budget // row_bytes // group * group)
    first, last = span
    starts = stored.starts
    cuts = list(map(sub, starts[bisect.bisect_right(starts, first) : bisect.bisect_left(starts, last)], repeat(first)))
    for i in stored.big:  # a chunk larger than a round: its rows go in slices of the budget
        start, stop = starts[i], stored.ends[i]
        cuts += (c - first for c in range((max(start, first) // per + 1) * per, min(stop, last), per))
    blocks = row_blocks(last - first, row_bytes, budget, group, cuts)
    if whole and len(blocks) == 1:
        return None
    return [(first + a, first + b) for a, b in blocks]
