"""Blocks of rows: how a tensor larger than a read (or an exchange round) is cut, for `--strategy read` and
`exchange` alike. Pure. Runs on: each rank, for the tensors it reads or receives.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence


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
