"""Cutting output files into pieces, one rank each: the job's bytes as one stream, split into equal work (bytes
written, plus the source bytes a rank quantizes) over the ranks at the places the files allow (between tensors,
or between rows of a tensor that allows it).
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
    (0: whole); making it costs its bytes plus `extra_work` (the source bytes of the weights it quantizes)."""

    start: int
    stop: int
    row_bytes: int = 0
    extra_work: int = 0

    @property
    def work(self) -> int:
        return self.stop - self.start + self.extra_work


def work_marks(nbytes: int, segments: Sequence[Segment]) -> tuple[list[int], int]:
    """Each segment's work offset at its start, and the file's work (bytes outside segments count as bytes)."""
    marks, work, at = [], 0, 0
    for seg in segments:
        work += seg.start - at
        marks.append(work)
        work += seg.work
        at = seg.stop
    return marks, work + nbytes - at


def snap(at: int, segments: Sequence[Segment], marks: Sequence[int]) -> int:
    """The byte offset of the cut whose work offset is closest to `at` (in one file's data region) that
    `segments` (at work offsets `marks`) allow. Pure."""
    if not segments:
        return 0
    i = max(0, bisect.bisect_right(marks, at) - 1)
    seg, begun = segments[i], at - marks[i]
    if seg.row_bytes and not seg.extra_work:
        rows = round(begun / seg.row_bytes)
        return min(seg.stop, seg.start + max(0, rows) * seg.row_bytes)
    return seg.start if begun <= seg.work - begun else seg.stop


def split_pieces(files: Sequence[tuple[int, Sequence[Segment]]], world_size: int) -> list[list[Piece]]:
    """Cut the files (as one stream, in file order) into `world_size` contiguous shares of near-equal work (bytes
    written, plus the source bytes of quantized weights), rank k the k-th; each file's part of a share is one of
    its pieces. Every cut is the allowed one closest to its ideal place (k x total work / world_size), or a file
    boundary within FILE_SLACK of a share; so no share exceeds the mean by more than two snaps (a row, or a tensor
    that must stay whole). A file with no data gets one empty piece. Pure: O(files x segments + ranks)."""
    if not files:
        return []
    bases, work_bases, marks = [0], [0], []
    for nbytes, segments in files:
        file_marks, work = work_marks(nbytes, segments)
        marks.append(file_marks)
        bases.append(bases[-1] + nbytes)
        work_bases.append(work_bases[-1] + work)
    total = work_bases[-1]
    slack = FILE_SLACK * total / max(1, world_size)
    cuts = [0]
    for k in range(1, world_size):
        ideal = k * total // world_size
        i = min(len(files) - 1, max(0, bisect.bisect_right(work_bases, ideal) - 1))
        near = min((i, i + 1), key=lambda j: abs(work_bases[j] - ideal))
        if abs(work_bases[near] - ideal) <= slack:
            cut = bases[near]
        else:
            cut = bases[i] + snap(ideal - work_bases[i], files[i][1], marks[i])
        cuts.append(max(cut, cuts[-1]))
    cuts.append(bases[-1])
    pieces: list[list[Piece]] = []
    for i, (nbytes, _) in enumerate(files):
        start, stop = bases[i], bases[i + 1]
        first = min(world_size - 1, bisect.bisect_right(cuts, start) - 1)
        mine = []
        for k in range(first, world_size):
            if cuts[k] >= stop:
                break
            if cuts[k + 1] > start and cuts[k + 1] > cuts[k]:  # two cuts at one place: rank k writes nothing
                mine.append(Piece(k, max(cuts[k], start) - start, min(cuts[k + 1], stop) - start))
        pieces.append(mine or [Piece(first, 0, nbytes)])
    return pieces
