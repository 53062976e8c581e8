"""`--strategy exchange`: which rank reads which source file, and which chunk travels to which rank in which round.

For checkpoints on node-local disks: every rank reads only the source files given to it, and the tensor
chunks go to the rank that writes them over the process group, in rounds. Everything here is pure and
deterministic, computed identically on every rank from metadata alone; the reads and collectives are in
`feed.py`.

Files to readers: the file saved by training rank `w` of `W` (DCP's `__w_0.distcp`) goes to rank
`w * world_size // W`. Ranks are laid out node by node in both jobs, so with the same number of nodes a file
is read on the node whose disk holds it (with W == world_size, rank w reads what rank w wrote). Files with no
writer rank go round-robin in name order.

The round budget (`round_budget`) is half of `--read-batch`: a rank's send and receive buffers of one round
together hold at most one read batch, beside the pipeline's own bytes in flight (write/overlap.py).

Pieces: a tensor of at most `budget` bytes moves whole. A larger one moves in blocks of rows of at most `budget`
bytes (`blocks.row_blocks`), cut where its stored chunks start (a chunk is read and verified whole, so it is the
smallest piece) and on its recipe's row group (per-row scales: any row; 128x128 tiles: 128 rows); the writer
casts or quantizes and writes each block at its offset, as `--strategy read` does. Tensors whose transform needs
them whole (a vocabulary resize, a rotary permutation, a recipe without a row group: the torchao-* ones) move
whole.

Rounds: each writing rank takes its pieces in write order, the ranks with the most bytes left first (they set
how many rounds there are); a round carries a piece while its receiver receives at most `budget` bytes and each
of its senders sends at most `budget` bytes in the round. A piece larger than that (a stored chunk larger than
the budget, or a tensor that moves whole) goes in a round where its receiver receives nothing else and each of
its senders whose slice does not fit sends nothing else.

Cost per rank: the round decision needs each piece's bytes per sender (integers, from the chunk table); only the
transfers this rank sends or receives are built (`rank=`).
Runs on: all ranks.
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


@dataclass(frozen=True)
class Transfer:
    """One chunk read by rank `src` and delivered to rank `dst` (which writes the tensor)."""

    chunk: SourceChunk
    src: int
    dst: int


@dataclass(frozen=True)
class Piece:
    """What a writing rank holds complete after a round: a tensor, or the block of its source rows [start, stop)
    (`rows`, when the tensor moves in blocks), and its source bytes."""

    rank: int
    tensor: TensorPlan
    rows: tuple[int, int] | None
    nbytes: int

    def holds(self, chunk: SourceChunk) -> bool:
        """Whether `chunk` belongs to this piece (its tensor, and its first row within the block)."""
        if chunk.key != self.tensor.source_key:
            return False
        return self.rows is None or self.rows[0] <= chunk.offsets[0] < self.rows[1]


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
            sizes[getattr(t, by)] += t.chunk.nbytes
        return sizes

    def pieces_for(self, rank: int) -> tuple[Piece, ...]:
        return tuple(p for p in self.pieces if p.rank == rank)


@dataclass(frozen=True)
class ExchangeSchedule:
    """Every round, in order; the same on every rank (with `rank=`, only that rank's transfers in each)."""

    rounds: tuple[Round, ...]
    readers: Mapping[str, int]  # source file -> the rank that reads it
    budget: int
    world_size: int


@dataclass(frozen=True)
class _Move:
    """A piece on its way: its chunks, and the bytes each reading rank sends of it."""

    piece: Piece
    chunks: tuple[SourceChunk, ...]
    slices: Mapping[int, int]


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


def piece_rows(t: TensorPlan, chunks: Sequence[SourceChunk], budget: int) -> list[tuple[int, int]] | None:
    """The blocks of source rows a tensor moves in, or None when it moves whole (it fits the budget, or its
    transform needs it whole). Blocks end where stored chunks start and on the recipe's row group. Pure."""
    nbytes = sum(c.nbytes for c in chunks)
    shape = t.source_shape or t.shape
    if nbytes <= budget or len(shape) < 1 or shape[0] < 2 or not (group := row_group(t)):
        return None
    cuts = [c.offsets[0] for c in chunks]
    blocks = row_blocks(shape[0], nbytes // shape[0], budget, group, cuts)
    return blocks if len(blocks) > 1 else None


def _moves(
    rank: int, t: TensorPlan, chunks: Sequence[SourceChunk], readers: Mapping[str, int], budget: int
) -> Iterator[_Move]:
    """The pieces of one tensor for its writing `rank`, in row order, each with its chunks and sender slices."""
    blocks = piece_rows(t, chunks, budget)
    if blocks is None:
        groups = [tuple(chunks)]
    else:
        starts = [b[0] for b in blocks]
        grouped: list[list[SourceChunk]] = [[] for _ in blocks]
        for c in chunks:
            grouped[bisect.bisect_right(starts, c.offsets[0]) - 1].append(c)
        groups = [tuple(g) for g in grouped]
    for number, group in enumerate(groups):
        slices: dict[int, int] = {}
        for c in group:
            slices[readers[c.file]] = slices.get(readers[c.file], 0) + c.nbytes
        rows = None if blocks is None else blocks[number]
        yield _Move(Piece(rank, t, rows, sum(slices.values())), group, slices)


def plan_exchange(
    needs: Mapping[int, Sequence[TensorPlan]],
    chunks: Mapping[str, Sequence[SourceChunk]],
    world_size: int,
    budget: int,
    rank: int | None = None,
) -> ExchangeSchedule:
    """The rounds that bring every tensor in `needs` (writing rank -> tensors in write order) to its writer.

    `chunks` maps each storage key to its stored chunks. Rounds are decided from each piece's bytes per sender
    (computed when the piece comes up, so a rank holds one tensor's pieces per writer at a time); with `rank`, a
    round keeps only the transfers that rank sends or receives (what it needs to run the exchange), else every
    transfer. Pure: the same inputs give the same schedule.
    """
    if budget <= 0:
        raise ValueError(f"exchange round budget must be positive, got {budget}")
    readers = assign_readers({c.file: c.writer for cs in chunks.values() for c in cs}, world_size)
    tensors = {r: deque(needs.get(r, ())) for r in range(world_size)}
    queues: dict[int, deque[_Move]] = {r: deque() for r in range(world_size)}
    left = {r: sum(t.source_nbytes for t in ts) for r, ts in tensors.items()}
    rounds = []
    while any(tensors.values()) or any(queues.values()):
        received, sent = [0] * world_size, [0] * world_size
        transfers: list[Transfer] = []
        pieces: list[Piece] = []
        for dst in sorted((r for r in tensors if tensors[r] or queues[r]), key=lambda r: (-left[r], r)):
            queue = queues[dst]
            while queue or tensors[dst]:
                if not queue:
                    t = tensors[dst].popleft()
                    queue.extend(_moves(dst, t, chunks[t.source_key], readers, budget))
                    if not queue:  # a tensor with no stored bytes (no chunks): nothing to move
                        queue.append(_Move(Piece(dst, t, None, 0), (), {}))
                move = queue[0]
                if not _fits(received[dst], move.piece.nbytes, move.slices, sent, budget):
                    break
                queue.popleft()
                received[dst] += move.piece.nbytes
                left[dst] -= move.piece.nbytes
                for src, n in move.slices.items():
                    sent[src] += n
                if rank is None or rank == dst:
                    transfers += [Transfer(c, readers[c.file], dst) for c in move.chunks]
                elif rank in move.slices:  # only the chunks this rank sends
                    transfers += [Transfer(c, rank, dst) for c in move.chunks if readers[c.file] == rank]
                pieces.append(move.piece)
        rounds.append(Round(tuple(transfers), tuple(pieces)))
    return ExchangeSchedule(tuple(rounds), readers, budget, world_size)


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
            read[t.src] += t.chunk.nbytes
            received[t.dst] += t.chunk.nbytes
            crossing += t.chunk.nbytes if t.src != t.dst else 0
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
