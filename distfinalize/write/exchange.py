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

from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import chain, compress, repeat
from operator import add, itemgetter
from typing import NamedTuple

from distfinalize.plan import TensorPlan
from distfinalize.sources import SourceChunk
from distfinalize.write.exchange_parts import Parts, Stored, piece_rows

Need = tuple[TensorPlan, tuple[int, int] | None]  # a tensor a rank writes, whole (None) or its rows [first, last)

_FILE, _WRITER = (itemgetter(SourceChunk._fields.index(f)) for f in ("file", "writer"))
_NOTHING = Parts((), (), (), ())


class Transfer(NamedTuple):
    """Rows of one chunk read by rank `src` and delivered to rank `dst` (which writes them): the whole chunk
    (`rows` None) or the tensor's rows [start, stop) of it. (A NamedTuple, immutable like a frozen dataclass: a
    schedule holds one per stored chunk, millions for the largest checkpoints, built in bulk.)"""

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


_NEW_TRANSFER = partial(tuple.__new__, Transfer)  # a Transfer from a tuple of its fields, without Python code


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
    """A piece on its way: its (chunk, rows) parts, the bytes each reading rank sends of it, the chunks larger than
    the budget it carries a slice of."""

    piece: Piece
    parts: Parts
    slices: Mapping[int, int]
    largest: int = 0  # the largest slice
    sliced: tuple[SourceChunk, ...] = ()
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


def _moves(rank: int, need: Need, stored: Stored, budget: int) -> Iterator[_Move]:
    """The pieces of one step for its writing `rank`, in row order, each with its parts, sender slices and the
    chunks larger than the budget it slices, and of those the ones whose last slice for this step it carries."""
    t, span = need
    blocks = piece_rows(t, span, stored, budget)
    groups = [stored.whole(span)] if blocks is None else stored.parts(blocks)
    sliced = [g.sliced(budget) for g in groups]
    last = {c: n for n, chunks in enumerate(sliced) for c in chunks}
    for number, group in enumerate(groups):
        slices = group.slices()
        rows = None if blocks is None else blocks[number]
        ends = frozenset(c for c in sliced[number] if last[c] == number)
        piece = Piece(rank, t, rows, sum(slices.values()))
        yield _Move(piece, group, slices, max(slices.values(), default=0), sliced[number], ends)


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
    every = list(chain.from_iterable(chunks.values()))
    readers = assign_readers(dict(zip(map(_FILE, every), map(_WRITER, every), strict=True)), world_size)
    steps = {r: deque(needs.get(r, ())) for r in range(world_size)}
    queues: dict[int, deque[_Move]] = {r: deque() for r in range(world_size)}
    left = {r: sum(need_bytes(n) for n in ns) for r, ns in steps.items()}
    current: dict[int, Need] = {}  # the step each writer is taking
    stored: dict[str, Stored] = {}
    slicing = _Slicing(readers, budget)
    busy = sorted((r for r in range(world_size) if steps[r]), key=lambda r: (-left[r], r))
    rounds = []
    while busy:
        for relaxed in (False, True):  # relaxed: a second chunk opens on a reader, when nothing else can move
            received, sending = [0] * world_size, _Sending(world_size, budget)
            transfers: list[Transfer] = []
            pieces: list[Piece] = []
            for dst in busy:
                queue = queues[dst]
                while queue or steps[dst]:
                    if not queue:
                        need = current[dst] = steps[dst].popleft()
                        key = need[0].source_key
                        held = stored.get(key) or stored.setdefault(key, Stored.of(chunks[key], readers, budget))
                        queue.extend(_moves(dst, need, held, budget))
                        if not queue:  # a tensor with no stored bytes (no chunks): nothing to move
                            queue.append(_Move(Piece(dst, need[0], need[1], 0), _NOTHING, {}))
                    move = queue[0]
                    if not sending.fits(received[dst], move):
                        break
                    if not relaxed and not slicing.allows(move):
                        break
                    queue.popleft()
                    slicing.take(move)
                    received[dst] += move.piece.nbytes
                    if not queue:  # a step's bytes leave its writer's count when it is complete: its order holds
                        left[dst] -= need_bytes(current[dst])
                    sending.add(move.slices)
                    parts = move.parts
                    if rank is None or rank == dst:
                        transfers += map(_NEW_TRANSFER, zip(parts.chunks, parts.readers, repeat(dst), parts.rows))
                    elif rank in move.slices:  # only the rows this rank sends
                        mine = compress(
                            zip(parts.chunks, repeat(rank), repeat(dst), parts.rows), map(rank.__eq__, parts.readers)
                        )
                        transfers += map(_NEW_TRANSFER, mine)
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

    def allows(self, move: _Move) -> bool:
        dst = move.piece.rank
        return all(self.open.get(self.readers[c.file], (c, dst)) == (c, dst) for c in move.sliced)

    def take(self, move: _Move) -> None:
        for c in move.sliced:
            reader, held = self.readers[c.file], (c, move.piece.rank)
            if c not in move.ends:
                self.open[reader] = held
            elif self.open.get(reader) == held:
                del self.open[reader]


class _Sending:
    """The bytes each rank sends in the round being built, and the most any one sends."""

    def __init__(self, world_size: int, budget: int) -> None:
        self.sent, self.most, self.budget = [0] * world_size, 0, budget

    def fits(self, received: int, move: _Move) -> bool:
        """Whether `move` fits the round, checked for its receiver (`received` so far) and each sender's slice: each
        stays within the budget, or carries this piece (its slice of it) alone."""
        if not move.slices:
            return True
        if received and received + move.piece.nbytes > self.budget:
            return False
        if self.most + move.largest <= self.budget:  # no sender can pass the budget
            return True
        now = list(map(self.sent.__getitem__, move.slices))  # the senders that already send: within the budget
        return all(map(self.budget.__ge__, map(add, compress(now, now), compress(move.slices.values(), now))))

    def add(self, slices: Mapping[int, int]) -> None:
        """Count a piece's slices (each sender once)."""
        sent = self.sent
        now = list(map(add, map(sent.__getitem__, slices), slices.values()))
        list(map(sent.__setitem__, slices, now))
        self.most = max(self.most, max(now, default=0))


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
