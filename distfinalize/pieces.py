"""Cutting output files into pieces, one rank each: the job's bytes as one stream, split evenly over the ranks
at the places the files allow (between tensors, or between rows of a tensor that allows it).
Pure, O(files x segments + ranks). Runs on: all ranks (every rank computes the same pieces).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

FILE_SLACK = 0.02  # a cut moves to a file boundary this close (share of a rank's bytes): files stay whole


@dataclass(frozen=True)
class Piece:
    """Bytes [start, stop) of a file's data region (offsets after the header) and the rank that writes them; the
    piece that starts at 0 writes the header too."""

    rank: int
    start: int
    stop: int

    @property
    def nbytes(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Segment:
    """Bytes [start, stop) of a file's data region that one rank writes whole, or cut between rows of `row_bytes`
    (0: whole)."""

    start: int
    stop: int
    row_bytes: int = 0


def snap(at: int, segments: Sequence[Segment], starts: Sequence[int]) -> int:
    """The cut closest to `at` (an offset in one file's data region) that `segments` (starting at `starts`)
    allow. Pure."""
    if not segments:
        return 0
    seg = segments[max(0, bisect.bisect_right(starts, at) - 1)]
    if seg.row_bytes:
        rows = round((at - seg.start) / seg.row_bytes)
        return min(seg.stop, seg.start + max(0, rows) * seg.row_bytes)
    return seg.start if at - seg.start <= seg.stop - at else seg.stop


def split_pieces(files: Sequence[tuple[int, Sequence[Segment]]], world_size: int) -> list[list[Piece]]:
    """Cut the files' bytes (as one stream, in file order) into `world_size` near-equal contiguous shares, rank k
    the k-th; each file's part of a share is one of its pieces. Every cut is the allowed one closest to its
    ideal place (k x total / world_size), or a file boundary within FILE_SLACK of a share; so no share exceeds
    the mean by more than two snaps (a row, or a tensor that must stay whole). A file with no data gets one
    empty piece. Pure: O(files x segments + ranks)."""
    if not files:
        return []
    bases = [0]
    for nbytes, _ in files:
        bases.append(bases[-1] + nbytes)
    total = bases[-1]
    slack = FILE_SLACK * total / max(1, world_size)
    cuts, starts = [0], {}
    for k in range(1, world_size):
        ideal = k * total // world_size
        i = min(len(files) - 1, max(0, bisect.bisect_right(bases, ideal) - 1))
        near = min((bases[i], bases[i + 1]), key=lambda b: abs(b - ideal))
        if abs(near - ideal) <= slack:
            cut = near
        else:
            segments = files[i][1]
            found = starts.setdefault(i, [s.start for s in segments])
            cut = bases[i] + snap(ideal - bases[i], segments, found)
        cuts.append(max(cut, cuts[-1]))
    cuts.append(total)
    pieces: list[list[Piece]] = []
    for i, (nbytes, _) in enumerate(files):
        start, stop = bases[i], bases[i + 1]
        first = min(world_size - 1, bisect.bisect_right(cuts, start) - 1)
        mine = []
        for k in range(first, world_size):
            if cuts[k] >= stop:
                break
            if cuts[k + 1] > start:
                mine.append(Piece(k, max(cuts[k], start) - start, min(cuts[k + 1], stop) - start))
        pieces.append(mine or [Piece(first, 0, nbytes)])
    return pieces
