"""Blocks of rows: how a tensor larger than a read (or an exchange round) is cut, for `--strategy read` and
`exchange` alike. Pure. Runs on: each rank, for the tensors it reads or receives.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from itertools import compress, repeat
from operator import mod, not_


def row_blocks(rows: int, row_bytes: int, limit: int, group: int, cuts: Sequence[int] | None) -> list[tuple[int, int]]:
    """A tensor's rows in blocks [start, stop) of at most `limit` bytes, each ending on a multiple of `group` rows
    (or the last row) and, when `cuts` are given (the rows where the source's stored chunks start, which are read
    whole), on a cut. A block that cannot be smaller goes alone, bigger. Pure."""
    if cuts is None:
        ends: Sequence[int] = range(1, rows)
    else:  # the distinct cuts inside the tensor, sorted
        ends = sorted(set(cuts))
        ends = ends[bisect.bisect_right(ends, 0) : bisect.bisect_left(ends, rows)]
    if group > 1:
        ends = list(compress(ends, map(not_, map(mod, ends, repeat(group)))))
    ends = [*ends, rows]
    per = max(1, limit // max(1, row_bytes))
    blocks, start, i = [], 0, 0
    while start < rows:
        j = bisect.bisect_right(ends, start + per) - 1  # the last end within the limit
        stop = ends[j] if j >= i and ends[j] > start else ends[i]
        blocks.append((start, stop))
        start = stop
        i = bisect.bisect_right(ends, start)
    return blocks
