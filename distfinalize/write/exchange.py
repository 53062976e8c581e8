"""`--strategy exchange`: which rank reads which source file, and which rows of which chunk travel to which rank in
which round.

For checkpoints on node-local disks: every rank reads only the source files given to it, and the rows of the
tensor chunks go to the rank that writes them over the process group, in rounds. Everything here is pure and
deterministic, computed from metadata alone (by rank 0, which holds the chunk table; write/rank.py splits the
schedule and sends each rank its part); the reads and collectives are in `feed.py`.

Files to readers: the file saved by training rank `w` of `W` (DCP's `__w_0.distcp`) goes to rank
`w * world_size // W`. Ranks are laid out node by node in both jobs, so with the same number of nodes a file
is read on the node whose disk holds it (with W == world_size, rank w reads what rank w wrote). Files with no
writer rank go round-robin in name order.

The round budget (`round_budget`) is half of `--read-batch`: a rank's send and receive buffers of one round
together hold at most one read batch, beside the pipeline's own bytes in flight (write/overlap.py).

Needs: each writing rank's steps in write order, a whole tensor or (the plan cut it between ranks, as for
`--strategy read`) the block of its rows [first, last) this rank writes.

Pieces: a whole tensor of at most `budget` bytes moves whole. Otherwise it moves in blocks of rows of at most
`budget` bytes (`piece_rows`), on its recipe's row group (per-row scales: any row; 128x128 tiles: 128 rows),
ending where stored chunks start when the chunks fit the budget, and inside a chunk larger than the budget;
the writer casts or quantizes and writes each block at its offset, as `--strategy read` does. A transfer carries
the rows of one stored chunk that fall in one piece (`Transfer.rows`): a chunk that straddles two pieces (a
writer's boundary, or a chunk larger than the budget) is sent in row slices, read and verified whole by its
reader (feed.py). Tensors whose transform needs them whole (a vocabulary resize, a rotary permutation, a recipe
without a row group: the torchao-* ones) move whole.

Rounds: each writing rank takes its pieces in write order, the ranks with the most bytes left first (they set
how many rounds there are); a round carries a piece while its receiver receives at most `budget` bytes and each
of its senders sends at most `budget` bytes in the round. A piece larger than that (a block of rows that cannot
be smaller, or a tensor that moves whole) goes in a round where its receiver receives nothing else and each of
its senders whose slice does not fit sends nothing else. A reader slices one chunk larger than the budget at a
time (it holds the chunk from its first slice for a writer to its last, `_Slicing`), unless nothing else can
move in a round. A writer keeps its place in the order until its current step is complete, so the writer that
started slicing a chunk keeps its priority on that reader.

Cost: O(chunks + pieces + rounds x writing ranks) for the whole schedule; with `rank=`, only the transfers that
rank sends or receives are built. Runs on: rank 0 (the whole schedule), or any rank for its own part.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from distfinalize.plan import TensorPlan
from distfinalize.sources import SourceChunk
from distfinalize.transform.cast import row_group
from distfinalize.write.blocks import row_blocks

Need = tuple[TensorPlan, tuple[int, int] | None]  # a tensor a rank writes, whole (None) or its rows [first, last)


@dataclass(frozen=True)
class Transfer:
    """Rows of one chunk read by rank `src` and delivered to rank `dst` (which writes them): the whole chunk
    (`rows` None) or the tensor's rows [start, stop) of it."""

    chunk: SourceChunk
    src: int
    dst: int
    rows: tuple[int, int] | None = None

    @property
    def nbytes(self) -> int:
        if self.rows is None:
            return self.chunk.nbytes
        return self.chunk.nbytes // self.chunk.sizes[0] * (self.rows[1] - self.rows[0])

    @property
    def span(self) -> tuple[int, int] | None:
        """The tensor's rows it carries (None for a 0-d chunk)."""
        if self.rows is not None:
            return self.rows
        return (self.chunk.offsets[0], self.chunk.offsets[0] + self.chunk.sizes[0]) if self.chunk.offsets else None


@dataclass(frozen=True)
class Piece:
    """What a writing rank holds complete after a round: a tensor, or the block of its source rows [start, stop)
    (`rows`), and its source bytes."""

    rank: int
    tensor: TensorPlan
    rows: tuple[int, int] | None
    nbytes: int

    def holds(self, transfer: Transfer) -> bool:
        """Whether `transfer` belongs to this piece (its tensor, and its first row within the block)."""
        if transfer.chunk.key != self.tensor.source_key:
            return False
        span = transfer.span
        return self.rows is None or (span is not None and self.rows[0] <= span[0] < self.rows[1])


@dataclass(frozen=True)
class Round:
    """The transfers of one collective, and the pieces each rank holds complete after it (in write order)."""

    transfers: tuple[Transfer, ...]
    pieces: tuple[Piece, ...]

    def sent_by(self, rank: int) -> tuple[Transfer, ...]:
        """What `rank` reads and sends, ordered by receiver (the send buffer's layout)."""
        return tuple(sorted((t for t in self.transfers if t.src == rank), key=lambda t: t.dst))

    def received_by(self, rank: int) -> tuple[Transfer, ...]:
        """What `rank` receives, ordered by sender (the receive buffer's layout)."""
        return tuple(sorted((t for t in self.transfers if t.dst == rank), key=lambda t: t.src))

    def split(self, transfers: Iterable[Transfer], world_size: int, by: str) -> list[int]:
        """Bytes per peer rank (`by` = "dst" for send splits, "src" for receive splits)."""
        sizes = [0] * world_size
        for t in transfers:
            sizes[getattr(t, by)] += t.nbytes
        return sizes

    def pieces_for(self, rank: int) -> tuple[Piece, ...]:
        return tuple(p for p in self.pieces if p.rank == rank)


@dataclass(frozen=True)
class ExchangeSchedule:
    """Every round, in order (with `rank=`, or after write/rank.split_schedule, only one rank's transfers)."""

    rounds: tuple[Round, ...]
    readers: Mapping[str, int]  # source file -> the rank that reads it
    budget: int
    world_size: int


@dataclass(frozen=True)
class _Move:
    """A piece on its way: its (chunk, rows) parts, and the bytes each reading rank sends of it."""

    piece: Piece
    parts: tuple[tuple[SourceChunk, tuple[int, int] | None], ...]
    slices: Mapping[int, int]
    ends: frozenset[SourceChunk] = frozenset()  # chunks whose last slice for this step this piece carries


def round_budget(read_batch: int) -> int:
    """The bytes a rank may receive, and may send, in one round: half of `--read-batch` each, so the send and the
    receive buffer together hold at most one read batch beside the pipeline's own (write/overlap.py). Pure."""
    return max(1, read_batch // 2)


def assign_readers(files: Mapping[str, int | None], world_size: int) -> dict[str, int]:
    """Source file -> reading rank, from the training rank that wrote each file (see the module docstring)."""
    writers = [w for w in files.values() if w is not None]
    saved = max(writers) + 1 if writers else 1
    unnamed = sorted(f for f, w in files.items() if w is None)
    readers = {f: w * world_size // saved for f, w in files.items() if w is not None}
    readers.update({f: i % world_size for i, f in enumerate(unnamed)})
    return readers


def piece_rows(
    t: TensorPlan, span: tuple[int, int] | None, chunks: Sequence[SourceChunk], budget: int, nbytes: int | None = None
) -> list[tuple[int, int]] | None:
    """The blocks of source rows a writer's step moves in: None when it moves whole (a whole tensor that fits the
    budget, or whose transform needs it whole), else blocks covering `span` (the rows the plan gives this rank;
    None: all of them) on the recipe's row group, ending where stored chunks start and every `budget` bytes inside
    a chunk larger than the budget. `chunks`: those holding rows of the span; `nbytes`: the whole tensor's stored
    bytes (default: the chunks'). Pure."""
    shape = t.source_shape or t.shape
    if len(shape) < 1 or shape[0] < 1:
        return None
    nbytes = sum(c.nbytes for c in chunks) if nbytes is None else nbytes
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
    cuts = set()
    for c in chunks:
        start, stop = c.offsets[0], c.offsets[0] + c.sizes[0]
        cuts.add(start)
        if c.nbytes > budget:  # a chunk larger than a round: its rows go in slices of the budget
            cuts.update(range((max(start, first) // per + 1) * per, min(stop, last), per))
    blocks = row_blocks(last - first, row_bytes, budget, group, sorted(c - first for c in cuts if first < c < last))
    if whole and len(blocks) == 1:
        return None
    return [(first + a, first + b) for a, b in blocks]


@dataclass(frozen=True)
class _Stored:
    """A tensor's stored chunks sorted by first row (a 0-d tensor's as they are), their first rows, the most rows
    one holds, and their bytes."""

    chunks: tuple[SourceChunk, ...]
    starts: tuple[int, ...]
    longest: int
    nbytes: int

    @classmethod
    def of(cls, chunks: Sequence[SourceChunk]) -> _Stored:
        if not chunks or not chunks[0].offsets:
            return cls(tuple(chunks), (), 1, sum(c.nbytes for c in chunks))
        ordered = tuple(sorted(chunks, key=lambda c: c.offsets))
        longest = max(c.sizes[0] for c in ordered)
        return cls(ordered, tuple(c.offsets[0] for c in ordered), longest, sum(c.nbytes for c in ordered))

    def overlapping(self, span: tuple[int, int] | None) -> Sequence[SourceChunk]:
        """The chunks holding rows of `span` (None: all), found by bisection: O(log chunks + those)."""
        if span is None or not self.starts:
            return self.chunks
        lo = bisect.bisect_left(self.starts, span[0] - self.longest + 1)
        hi = bisect.bisect_left(self.starts, span[1])
        return [c for c in self.chunks[lo:hi] if c.offsets[0] + c.sizes[0] > span[0]]


def _parts(
    chunks: Sequence[SourceChunk], blocks: Sequence[tuple[int, int]]
) -> list[list[tuple[SourceChunk, tuple[int, int] | None]]]:
    """The (chunk, rows) parts of each block: the rows of every chunk (sorted by first row) that fall in it, rows
    None when the whole chunk does. One pass over both. Pure."""
    out: list[list[tuple[SourceChunk, tuple[int, int] | None]]] = [[] for _ in blocks]
    i = 0
    for c in chunks:
        lo = c.offsets[0]
        hi = lo + c.sizes[0]
        while i < len(blocks) and blocks[i][1] <= lo:
            i += 1
        j = i
        while j < len(blocks) and blocks[j][0] < hi:
            a, b = blocks[j]
            a, b = max(lo, a), min(hi, b)
            if a < b:
                out[j].append((c, None if a == lo and b == hi else (a, b)))
            j += 1
    return out


def _moves(rank: int, need: Need, stored: _Stored, readers: Mapping[str, int], budget: int) -> Iterator[_Move]:
    """The pieces of one step for its writing `rank`, in row order, each with its parts, sender slices and the
    chunks larger than the budget whose last slice for this step it carries."""
    t, span = need
    chunks = stored.overlapping(span)
    blocks = piece_rows(t, span, chunks, budget, stored.nbytes)
    if blocks is None:
        groups: list[list[tuple[SourceChunk, tuple[int, int] | None]]] = [[(c, None) for c in chunks]]
        last: dict[SourceChunk, int] = {}
    else:
        groups = _parts(chunks, blocks)
        last = {c: n for n, g in enumerate(groups) for c, rows in g if rows is not None and c.nbytes > budget}
    for number, group in enumerate(groups):
        slices: dict[int, int] = {}
        for c, rows in group:
            reader = readers[c.file]
            n = c.nbytes if rows is None else c.nbytes // c.sizes[0] * (rows[1] - rows[0])
            slices[reader] = slices.get(reader, 0) + n
        rows = None if blocks is None else blocks[number]
        ends = frozenset(c for c, r in group if r is not None and last.get(c) == number) if last else frozenset()
        yield _Move(Piece(rank, t, rows, sum(slices.values())), tuple(group), slices, ends)


def need_bytes(need: Need) -> int:
    """A step's source bytes: the tensor's, or its rows' share."""
    t, span = need
    if span is None:
        return t.source_nbytes
    return t.source_nbytes * (span[1] - span[0]) // (t.source_shape or t.shape)[0]


def plan_exchange(
    needs: Mapping[int, Sequence[Need]],
    chunks: Mapping[str, Sequence[SourceChunk]],
    world_size: int,
    budget: int,
    rank: int | None = None,
) -> ExchangeSchedule:
    """The rounds that bring every step in `needs` (writing rank -> (tensor, rows or None) in write order) to its
    writer.

    `chunks` maps each storage key to its stored chunks. Rounds are decided from each piece's bytes per sender
    (computed when the piece comes up, so the schedule holds one step's pieces per writer at a time); with
    `rank`, a round keeps only the transfers that rank sends or receives, else every transfer. Pure: the same
    inputs give the same schedule.
    """
    if budget <= 0:
        raise ValueError(f"exchange round budget must be positive, got {budget}")
    readers = assign_readers({c.file: c.writer for cs in chunks.values() for c in cs}, world_size)
    steps = {r: deque(needs.get(r, ())) for r in range(world_size)}
    queues: dict[int, deque[_Move]] = {r: deque() for r in range(world_size)}
    left = {r: sum(need_bytes(n) for n in ns) for r, ns in steps.items()}
    current: dict[int, Need] = {}  # the step each writer is taking
    stored: dict[str, _Stored] = {}
    slicing = _Slicing(readers, budget)
    busy = sorted((r for r in range(world_size) if steps[r]), key=lambda r: (-left[r], r))
    rounds = []
    while busy:
        for relaxed in (False, True):  # relaxed: a second chunk opens on a reader, when nothing else can move
            received, sent = [0] * world_size, [0] * world_size
            transfers: list[Transfer] = []
            pieces: list[Piece] = []
            for dst in busy:
                queue = queues[dst]
                while queue or steps[dst]:
                    if not queue:
                        need = current[dst] = steps[dst].popleft()
                        key = need[0].source_key
                        held = stored.get(key) or stored.setdefault(key, _Stored.of(chunks[key]))
                        queue.extend(_moves(dst, need, held, readers, budget))
                        if not queue:  # a tensor with no stored bytes (no chunks): nothing to move
                            queue.append(_Move(Piece(dst, need[0], need[1], 0), (), {}))
                    move = queue[0]
                    if not _fits(received[dst], move.piece.nbytes, move.slices, sent, budget):
                        break
                    if not relaxed and not slicing.allows(move):
                        break
                    queue.popleft()
                    slicing.take(move)
                    received[dst] += move.piece.nbytes
                    if not queue:  # a step's bytes leave its writer's count when it is complete: its order holds
                        left[dst] -= need_bytes(current[dst])
                    for src, n in move.slices.items():
                        sent[src] += n
                    if rank is None or rank == dst:
                        transfers += [Transfer(c, readers[c.file], dst, rows) for c, rows in move.parts]
                    elif rank in move.slices:  # only the rows this rank sends
                        transfers += [Transfer(c, rank, dst, rows) for c, rows in move.parts if readers[c.file] == rank]
                    pieces.append(move.piece)
            if pieces:
                break
        rounds.append(Round(tuple(transfers), tuple(pieces)))
        busy = sorted((r for r in busy if steps[r] or queues[r]), key=lambda r: (-left[r], r))
    return ExchangeSchedule(tuple(rounds), readers, budget, world_size)


class _Slicing:
    """The chunks larger than the budget that readers are sending in slices of rows to a writer. feed.py holds
    such a chunk from its first slice for a writer's step to its last (`_Move.ends`; another writer's rows of it
    are read again), so a reader slices one at a time: a piece that would open a second one on a reader waits
    (unless nothing else can move that round)."""

    def __init__(self, readers: Mapping[str, int], budget: int) -> None:
        self.readers, self.budget = readers, budget
        self.open: dict[int, tuple[SourceChunk, int]] = {}  # reader -> the chunk it is slicing, and for whom

    def _sliced(self, move: _Move) -> Iterator[SourceChunk]:
        return (c for c, rows in move.parts if rows is not None and c.nbytes > self.budget)

    def allows(self, move: _Move) -> bool:
        dst = move.piece.rank
        return all(self.open.get(self.readers[c.file], (c, dst)) == (c, dst) for c in self._sliced(move))

    def take(self, move: _Move) -> None:
        for c in self._sliced(move):
            reader, held = self.readers[c.file], (c, move.piece.rank)
            if c not in move.ends:
                self.open[reader] = held
            elif self.open.get(reader) == held:
                del self.open[reader]


def _fits(received: int, incoming: int, outgoing: Mapping[int, int], sent: list[int], budget: int) -> bool:
    """Whether a piece fits the round, checked for its receiver (`received` so far, `incoming` more) and each
    sender's slice: each stays within the budget, or carries this piece (its slice of it) alone."""
    if not outgoing:
        return True
    if received and received + incoming > budget:
        return False
    return all(sent[s] == 0 or sent[s] + n <= budget for s, n in outgoing.items())


def describe(schedule: ExchangeSchedule) -> dict[str, object]:
    """A JSON-able summary (for --dry-run): rounds, bytes each rank reads, bytes that cross ranks, and the most
    bytes one rank receives in a round (its receive buffer)."""
    read = [0] * schedule.world_size
    crossing = largest = 0
    for r in schedule.rounds:
        received = [0] * schedule.world_size
        for t in r.transfers:
            read[t.src] += t.nbytes
            received[t.dst] += t.nbytes
            crossing += t.nbytes if t.src != t.dst else 0
        largest = max(largest, *received)
    files = [0] * schedule.world_size
    for rank in schedule.readers.values():
        files[rank] += 1
    return {
        "rounds": len(schedule.rounds),
        "round_budget": schedule.budget,
        "largest_round_bytes": largest,
        "files_per_rank": files,
        "bytes_read_per_rank": read,
        "bytes_over_the_wire": crossing,
    }
