"""`--strategy exchange`: which rank reads which source file, and which chunk travels to which rank in which round.

For checkpoints on node-local disks: every rank reads only the source files given to it, and the tensor
chunks go to the rank that writes them over the process group, in rounds. Everything here is pure and
deterministic, computed identically on every rank from metadata alone; the reads and collectives are in
`feed.py`.

Files to readers: the file saved by training rank `w` of `W` (DCP's `__w_0.distcp`) goes to rank
`w * world_size // W`. Ranks are laid out node by node in both jobs, so with the same number of nodes a file
is read on the node whose disk holds it (with W == world_size, rank w reads what rank w wrote). Files with no
writer rank go round-robin in name order.

Rounds: each writing rank takes the tensors it needs in its write order, the ranks with the most bytes left
first (they set how many rounds there are); a round carries whole tensors
(every chunk of a tensor in the same round) while no rank receives more than `budget` bytes and no rank
sends more than `budget` bytes, checked per receiver and per sender's slice: a tensor larger than the budget
goes in a round where its receiver receives nothing else, and each of its senders whose slice does not fit
sends nothing else, so several large tensors (for different receivers, from senders with room) move per round.
Runs on: all ranks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from distfinalize.plan import TensorPlan
from distfinalize.sources import SourceChunk


@dataclass(frozen=True)
class Transfer:
    """One chunk read by rank `src` and delivered to rank `dst` (which writes the tensor)."""

    chunk: SourceChunk
    src: int
    dst: int


@dataclass(frozen=True)
class Round:
    """The transfers of one collective, and the tensors each rank holds complete after it (in write order)."""

    transfers: tuple[Transfer, ...]
    tensors: tuple[tuple[int, TensorPlan], ...]  # (writing rank, tensor)

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

    def tensors_for(self, rank: int) -> tuple[TensorPlan, ...]:
        return tuple(t for r, t in self.tensors if r == rank)


@dataclass(frozen=True)
class ExchangeSchedule:
    """Every round, in order; the same on every rank."""

    rounds: tuple[Round, ...]
    readers: Mapping[str, int]  # source file -> the rank that reads it
    budget: int
    world_size: int


def assign_readers(files: Mapping[str, int | None], world_size: int) -> dict[str, int]:
    """Source file -> reading rank, from the training rank that wrote each file (see the module docstring)."""
    writers = [w for w in files.values() if w is not None]
    saved = max(writers) + 1 if writers else 1
    unnamed = sorted(f for f, w in files.items() if w is None)
    readers = {f: w * world_size // saved for f, w in files.items() if w is not None}
    readers.update({f: i % world_size for i, f in enumerate(unnamed)})
    return readers


def plan_exchange(
    needs: Mapping[int, Sequence[TensorPlan]],
    chunks: Mapping[str, Sequence[SourceChunk]],
    world_size: int,
    budget: int,
    rank: int | None = None,
) -> ExchangeSchedule:
    """The rounds that bring every tensor in `needs` (writing rank -> tensors in write order) to its writer.

    `chunks` maps each storage key to its stored chunks. Rounds are decided from each tensor's bytes per sender
    (computed once per tensor); with `rank`, a round keeps only the transfers that rank sends or receives (what
    it needs to run the exchange), else every transfer. Pure: the same inputs give the same schedule.
    """
    if budget <= 0:
        raise ValueError(f"exchange round budget must be positive, got {budget}")
    readers = assign_readers({c.file: c.writer for cs in chunks.values() for c in cs}, world_size)
    slices: dict[str, dict[int, int]] = {}  # storage key -> bytes each reading rank sends of it
    for key in {t.source_key for ts in needs.values() for t in ts}:
        out = slices[key] = {}
        for c in chunks[key]:
            out[readers[c.file]] = out.get(readers[c.file], 0) + c.nbytes
    queues = {r: deque(needs.get(r, ())) for r in range(world_size)}
    left = {r: sum(sum(slices[t.source_key].values()) for t in queue) for r, queue in queues.items()}
    rounds = []
    while any(queues.values()):
        received, sent = [0] * world_size, [0] * world_size
        transfers: list[Transfer] = []
        tensors: list[tuple[int, TensorPlan]] = []
        for dst in sorted((r for r in queues if queues[r]), key=lambda r: (-left[r], r)):  # most left first
            queue = queues[dst]
            while queue:
                key = queue[0].source_key
                incoming, outgoing = sum(slices[key].values()), slices[key]
                if not _fits(received[dst], incoming, outgoing, sent, budget):
                    break
                received[dst] += incoming
                left[dst] -= incoming
                for src, n in outgoing.items():
                    sent[src] += n
                if rank is None or rank == dst or rank in outgoing:
                    moves = (Transfer(c, readers[c.file], dst) for c in chunks[key])
                    transfers += [m for m in moves if rank is None or rank in (m.src, m.dst)]
                tensors.append((dst, queue.popleft()))
        rounds.append(Round(tuple(transfers), tuple(tensors)))
    return ExchangeSchedule(tuple(rounds), readers, budget, world_size)


def _fits(received: int, incoming: int, outgoing: Mapping[int, int], sent: list[int], budget: int) -> bool:
    """Whether a tensor fits the round, checked for its receiver (`received` so far, `incoming` more) and each
    sender's slice: each stays within the budget, or carries this tensor (its slice of it) alone."""
    if not outgoing:
        return True
    if received and received + incoming > budget:
        return False
    return all(sent[s] == 0 or sent[s] + n <= budget for s, n in outgoing.items())


def describe(schedule: ExchangeSchedule) -> dict[str, object]:
    """A JSON-able summary (for --dry-run): rounds, bytes each rank reads, and bytes that cross ranks."""
    read = [0] * schedule.world_size
    crossing = 0
    for r in schedule.rounds:
        for t in r.transfers:
            read[t.src] += t.chunk.nbytes
            crossing += t.chunk.nbytes if t.src != t.dst else 0
    files = [0] * schedule.world_size
    for rank in schedule.readers.values():
        files[rank] += 1
    return {
        "rounds": len(schedule.rounds),
        "round_budget": schedule.budget,
        "files_per_rank": files,
        "bytes_read_per_rank": read,
        "bytes_over_the_wire": crossing,
    }
