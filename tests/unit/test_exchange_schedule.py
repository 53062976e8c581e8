"""The exchange schedule: every needed chunk delivered exactly once, in write order, within the round budget."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distfinalize.plan import FilePlan, TensorPlan
from distfinalize.sources import SourceChunk
from distfinalize.write.exchange import Piece, Transfer, assign_readers, describe, plan_exchange
from distfinalize.write.overlap import lane_order


@st.composite
def layouts(draw: st.DrawFn):
    """Tensors split into row chunks over the files of `saved` training ranks, needed by `world` writers: whole, or
    (as the plan cuts a tensor between ranks) one block of rows per writer."""
    saved = draw(st.integers(1, 5))
    world = draw(st.integers(1, 5))
    count = draw(st.integers(0, 12))
    tensors, chunks = [], {}
    for i in range(count):
        rows = draw(st.integers(1, 40))
        cuts = sorted(set(draw(st.lists(st.integers(1, rows), max_size=3))) | {rows})
        start, parts = 0, []
        for index, end in enumerate(cuts):
            writer = draw(st.integers(0, saved - 1))
            parts.append(
                SourceChunk(
                    f"k{i}", index, f"__{writer}_0.distcp", writer, (start, 0), (end - start, 3), (end - start) * 3 * 4
                )
            )
            start = end
        tensors.append(TensorPlan(f"w{i}", f"k{i}", (rows, 3), torch.float32, torch.float32))
        chunks[f"k{i}"] = tuple(parts)
    needs: dict[int, list] = {r: [] for r in range(world)}
    for t in tensors:
        rows = t.shape[0]
        bounds = sorted(set(draw(st.lists(st.integers(1, rows - 1), max_size=2))) if rows > 1 else [])
        if not bounds:
            needs[draw(st.integers(0, world - 1))].append((t, None))
            continue
        for a, b in zip([0, *bounds], [*bounds, rows], strict=True):  # cut between writers, as the plan cuts
            needs[draw(st.integers(0, world - 1))].append((t, (a, b)))
    budget = draw(st.integers(1, 800))
    return needs, chunks, world, budget


@settings(max_examples=300, deadline=None)
@given(layouts())
def test_schedule_delivers_every_byte_once_within_budget(layout) -> None:
    """Every stored row of every chunk reaches each writer that needs it exactly once, in the round of the piece
    that holds it; a receiver over the budget in a round takes one piece, a sender over it sends one piece's slice;
    each writer's pieces come in write order and cover its rows in order."""
    needs, chunks, world, budget = layout
    schedule = plan_exchange(needs, chunks, world, budget)
    assert schedule == plan_exchange(needs, chunks, world, budget)  # pure and deterministic
    delivered: dict[int, list[Piece]] = {r: [] for r in range(world)}
    moved: list[tuple[str, int, int, int]] = []  # (key, chunk, writer, row): one per row delivered
    for rnd in schedule.rounds:
        assert rnd.pieces, "every round makes progress"
        for rank in range(world):
            mine = rnd.pieces_for(rank)
            delivered[rank] += mine
            got, sent = rnd.received_by(rank), rnd.sent_by(rank)
            for p in mine:  # within the budget, or one row (a 12-byte row here) that cannot be cut
                rows = p.rows or (0, p.tensor.shape[0])
                assert p.nbytes <= budget or rows[1] - rows[0] == 1, (p, budget)
            if sum(t.nbytes for t in got) > budget:
                assert len(mine) == 1
            if sum(t.nbytes for t in sent) > budget:
                assert len({(t.dst, owner(rnd, t)) for t in sent}) == 1
            assert sum(t.nbytes for t in got) == sum(p.nbytes for p in mine)
            assert sum(rnd.split(sent, world, "dst")) == sum(t.nbytes for t in sent)
        for move in rnd.transfers:
            assert move.src == schedule.readers[move.chunk.file]  # read by the rank the file was given to
            piece = owner(rnd, move)  # delivered in the same round as its piece, within its rows
            lo, hi = move.span
            assert piece.rows is None or piece.rows[0] <= lo < hi <= piece.rows[1]
            assert move.chunk.offsets[0] <= lo < hi <= move.chunk.offsets[0] + move.chunk.sizes[0]
            moved += [(move.chunk.key, move.chunk.index, move.dst, row) for row in range(lo, hi)]
    for rank in range(world):  # every step once, in write order, its blocks in row order covering its rows
        assert merged([(p.tensor, p.rows) for p in delivered[rank]]) == merged(needs[rank])
    wanted = [
        (c.key, c.index, r, row)
        for r in range(world)
        for t, span in needs[r]
        for c in chunks[t.source_key]
        for row in range(c.offsets[0], c.offsets[0] + c.sizes[0])
        if span is None or span[0] <= row < span[1]
    ]
    assert sorted(moved) == sorted(wanted)  # every stored row exactly once to each writer of it
    read = describe(schedule)["bytes_read_per_rank"]
    assert sum(read) == len(wanted) * 3 * 4


def owner(rnd, move) -> Piece:
    """The one piece of the round that a transfer belongs to."""
    (piece,) = [p for p in rnd.pieces_for(move.dst) if p.holds(move)]
    return piece


def merged(steps) -> list:
    """Steps (tensor, rows or None) with consecutive blocks of one tensor joined, a whole tensor as all its rows."""
    out: list = []
    for t, rows in steps:
        rows = rows or (0, t.shape[0])
        if out and out[-1][0] is t and out[-1][1][1] == rows[0]:
            out[-1] = (t, (out[-1][1][0], rows[1]))
        else:
            out.append((t, rows))
    return out


def whole(tensors) -> list:
    return [(t, None) for t in tensors]


def test_budget_splits_rounds() -> None:
    chunks = {f"k{i}": (SourceChunk(f"k{i}", 0, "__0_0.distcp", 0, (0,), (10,), 40),) for i in range(4)}
    tensors = [TensorPlan(f"w{i}", f"k{i}", (10,), torch.float32, torch.float32) for i in range(4)]
    schedule = plan_exchange({0: whole(tensors[:2]), 1: whole(tensors[2:])}, chunks, 2, budget=80)
    # rank 0 reads everything and may send 80 bytes a round: two tensors per round
    assert [len(r.transfers) for r in schedule.rounds] == [2, 2]
    assert describe(schedule)["bytes_over_the_wire"] == 80


@pytest.mark.parametrize(
    ("writers", "world", "expected"),
    [
        ({"__0_0.distcp": 0, "__1_0.distcp": 1}, 2, {"__0_0.distcp": 0, "__1_0.distcp": 1}),
        (
            {f"__{w}_0.distcp": w for w in range(4)},
            2,
            {"__0_0.distcp": 0, "__1_0.distcp": 0, "__2_0.distcp": 1, "__3_0.distcp": 1},
        ),
        ({"__0_0.distcp": 0, "__1_0.distcp": 1}, 4, {"__0_0.distcp": 0, "__1_0.distcp": 2}),
        ({"b": None, "a": None, "c": None}, 2, {"a": 0, "b": 1, "c": 0}),
    ],
)
def test_files_go_to_the_ranks_on_their_node(writers: dict, world: int, expected: dict) -> None:
    assert assign_readers(writers, world) == expected


def test_lane_order_interleaves_open_files() -> None:
    def file(name: str, n: int) -> FilePlan:
        return FilePlan(
            name, 0, tuple(TensorPlan(f"{name}{i}", "k", (1,), torch.float32, torch.float32) for i in range(n))
        )

    files = [file("a", 2), file("b", 1), file("c", 2)]
    steps = lane_order(files, 2, lambda f: list(f.tensors))
    assert [(s.lane, s.tensor.name) for s in steps] == [(0, "a0"), (1, "b0"), (0, "a1"), (1, "c0"), (1, "c1")]
    assert [(s.lane, s.tensor.name) for s in lane_order(files, 1, lambda f: list(f.tensors))] == [
        (0, "a0"),
        (0, "a1"),
        (0, "b0"),
        (0, "c0"),
        (0, "c1"),
    ]


def fsdp2_chunks(name: str, rows: int, cols: int, world: int) -> tuple[SourceChunk, ...]:
    """A float32 tensor row-sharded as FSDP2 saves it: training rank w's rows in `__w_0.distcp`."""
    per = -(-rows // world)
    out = []
    for w in range(world):
        start, stop = min(rows, w * per), min(rows, (w + 1) * per)
        if stop > start:
            out.append(
                SourceChunk(
                    name, len(out), f"__{w}_0.distcp", w, (start, 0), (stop - start, cols), (stop - start) * cols * 4
                )
            )
    return tuple(out)


def test_tensors_over_the_budget_move_in_row_blocks() -> None:
    """Row-sharded like FSDP2 (every rank wrote a slice of every tensor), each tensor twice the budget: each moves
    in blocks of rows within the budget for its receiver and every sender, several receivers per round."""
    world = 4
    chunks = {f"k{i}": fsdp2_chunks(f"k{i}", 100, 1, world) for i in range(world)}
    tensors = [TensorPlan(f"w{i}", f"k{i}", (100, 1), torch.float32, torch.float32) for i in range(world)]
    schedule = plan_exchange({r: whole([tensors[r]]) for r in range(world)}, chunks, world, budget=200)
    for rnd in schedule.rounds:
        for rank in range(world):
            assert sum(t.nbytes for t in rnd.sent_by(rank)) <= 200
            assert sum(t.nbytes for t in rnd.received_by(rank)) <= 200
    assert {p.rows for rnd in schedule.rounds for p in rnd.pieces} == {(0, 50), (50, 100)}
    assert len(schedule.rounds) <= 2 * 2  # the ideal: 400 bytes per rank over 200 a round
    assert describe(schedule)["largest_round_bytes"] == 200


@pytest.mark.parametrize(
    ("quant", "rope_heads", "expected"),
    [
        (None, None, [(0, 64), (64, 128), (128, 192), (192, 256), (256, 320), (320, 384), (384, 448), (448, 512)]),
        ("fp8", None, [(0, 64), (64, 128), (128, 192), (192, 256), (256, 320), (320, 384), (384, 448), (448, 512)]),
        ("fp8-block", None, [(0, 128), (128, 256), (256, 384), (384, 512)]),  # one scale per 128x128 tile
        (None, 4, [None]),  # the rotary permutation needs every row: whole
    ],
)
def test_row_blocks_respect_the_recipe(quant: str | None, rope_heads: int | None, expected: list) -> None:
    """Blocks end where chunks start (every 64 rows) and on the recipe's row group; a tensor whose transform needs
    it whole moves whole (in a round of its own for its receiver, over the budget)."""
    chunks = {"k": fsdp2_chunks("k", 512, 128, 8)}  # 256 KiB, chunks of 32 KiB
    t = TensorPlan("w", "k", (512, 128), torch.float32, torch.bfloat16, quant=quant, rope_heads=rope_heads)
    schedule = plan_exchange({0: [(t, None)]}, chunks, 2, budget=40 * 1024)
    assert [p.rows for rnd in schedule.rounds for p in rnd.pieces] == expected


@settings(max_examples=60, deadline=None)
@given(
    world=st.integers(2, 16),
    sizes=st.lists(st.tuples(st.integers(1, 300), st.integers(1, 64)), min_size=1, max_size=30),
    budget_rows=st.integers(1, 200),
    seed=st.integers(0, 2**16),
)
def test_rounds_within_twice_the_ideal(world: int, sizes: list, budget_rows: int, seed: int) -> None:
    """FSDP2 layouts saved by the same world size, tensors spread over the writers: rounds at most twice the
    busiest rank's bytes (sent or received) over the budget, plus one."""
    chunks = {f"k{i}": fsdp2_chunks(f"k{i}", rows, cols, world) for i, (rows, cols) in enumerate(sizes)}
    tensors = [TensorPlan(f"w{i}", f"k{i}", shape, torch.float32, torch.float32) for i, shape in enumerate(sizes)]
    needs = {r: [(t, None) for i, t in enumerate(tensors) if (i * 7 + seed) % world == r] for r in range(world)}
    budget = budget_rows * 64 * 4
    schedule = plan_exchange(needs, chunks, world, budget)
    sent, received = [0] * world, [0] * world
    for rnd in schedule.rounds:
        for t in rnd.transfers:
            sent[t.src] += t.nbytes
            received[t.dst] += t.nbytes
    biggest_chunk = max(c.nbytes for cs in chunks.values() for c in cs)
    if biggest_chunk <= budget:  # every piece fits a round
        ideal = -(-max(*sent, *received) // budget)
        assert len(schedule.rounds) <= 2 * ideal + 1


def test_row_blocks_are_written_back_bit_for_bit() -> None:
    """The pieces put together from the bytes each transfer carries (feed.assemble, as the receiver does) and
    stacked at their row offsets give every tensor back exactly, whole or in blocks, 2-D shards included."""
    from distfinalize.write.feed import assemble

    world, budget = 3, 200
    gen = torch.Generator().manual_seed(0)
    data = {
        "a": torch.randn(20, 6, generator=gen),
        "b": torch.randn(4, 5, generator=gen),
        "c": torch.randn(9, 8, generator=gen),
    }
    chunks = {
        "a": fsdp2_chunks("a", 20, 6, world),
        "b": fsdp2_chunks("b", 4, 5, world),
        "c": tuple(  # rows in three bands, the middle band in two column halves (uneven 2-D sharding)
            SourceChunk("c", i, f"__{w}_0.distcp", w, off, size, size[0] * size[1] * 4)
            for i, (w, off, size) in enumerate(
                [(0, (0, 0), (3, 8)), (1, (3, 0), (4, 3)), (2, (3, 3), (4, 5)), (0, (7, 0), (2, 8))]
            )
        ),
    }
    plans = {k: TensorPlan(f"w{k}", k, tuple(v.shape), torch.float32, torch.float32) for k, v in data.items()}
    needs = {0: whole([plans["a"], plans["c"]]), 1: whole([plans["b"]]), 2: []}
    schedule = plan_exchange(needs, chunks, world, budget)
    blocks = {p.tensor.source_key: [] for rnd in schedule.rounds for p in rnd.pieces}
    for rnd in schedule.rounds:
        for p in rnd.pieces:
            blocks[p.tensor.source_key].append(p.rows)
    assert blocks == {"a": [(0, 7), (7, 14), (14, 20)], "b": [None], "c": [(0, 3), (3, 9)]}
    out: dict[str, list[torch.Tensor]] = {}
    for rnd in schedule.rounds:
        for rank in range(world):
            receives = rnd.received_by(rank)
            buffer = (
                torch.cat([stored(data[m.chunk.key], m) for m in receives])
                if receives
                else torch.empty(0, dtype=torch.uint8)
            )
            for got in assemble(rnd, rank, receives, buffer, torch.device("cpu")):
                t, (tensor,), *rows = got
                if rows:
                    assert tensor.shape[0] == rows[0][1] - rows[0][0]
                out.setdefault(t.source_key, []).append(tensor)
    assert set(out) == set(data)
    for key, parts in out.items():
        assert torch.equal(torch.cat(parts), data[key])


def stored(tensor: torch.Tensor, move: Transfer) -> torch.Tensor:
    """The bytes a transfer carries as its reader sends them: its rows of the chunk's part of the tensor."""
    part = tensor
    for dim, (offset, size) in enumerate(zip(move.chunk.offsets, move.chunk.sizes, strict=True)):
        part = part.narrow(dim, offset, size)
    if move.rows is not None:
        part = part.narrow(0, move.rows[0] - move.chunk.offsets[0], move.rows[1] - move.rows[0])
    return part.contiguous().reshape(-1).view(torch.uint8)


def test_cut_tensors_and_large_chunks_are_written_back_bit_for_bit() -> None:
    """A tensor the plan cuts between three writers at rows inside its stored chunks, and a tensor stored in chunks
    larger than the budget: each writer gets exactly its rows, in blocks within the budget (the large chunks in
    slices), put back together bit for bit."""
    from distfinalize.write.feed import assemble

    world, budget = 3, 256
    gen = torch.Generator().manual_seed(1)
    data = {"a": torch.randn(30, 4, generator=gen), "b": torch.randn(24, 8, generator=gen)}
    chunks = {"a": fsdp2_chunks("a", 30, 4, world), "b": fsdp2_chunks("b", 24, 8, 2)}  # b: chunks of 384 bytes
    plans = {k: TensorPlan(f"w{k}", k, tuple(v.shape), torch.float32, torch.float32) for k, v in data.items()}
    needs = {0: [(plans["a"], (0, 5))], 1: [(plans["a"], (5, 23)), (plans["b"], None)], 2: [(plans["a"], (23, 30))]}
    schedule = plan_exchange(needs, chunks, world, budget)
    out: dict[tuple[int, str], list] = {}
    for rnd in schedule.rounds:
        for rank in range(world):
            receives, sent = rnd.received_by(rank), rnd.sent_by(rank)
            assert sum(m.nbytes for m in receives) <= budget and sum(m.nbytes for m in sent) <= budget
            buffer = torch.cat([stored(data[m.chunk.key], m) for m in receives] or [torch.empty(0, dtype=torch.uint8)])
            for t, (tensor,), *rows in assemble(rnd, rank, receives, buffer, torch.device("cpu")):
                out.setdefault((rank, t.source_key), []).append((rows[0] if rows else None, tensor))
    sliced = [m for rnd in schedule.rounds for m in rnd.transfers if m.rows is not None]
    assert {m.chunk.key for m in sliced} == {"a", "b"}  # straddled chunks of a, large chunks of b, sent in slices
    for (rank, key), parts in out.items():
        first = parts[0][0][0] if parts[0][0] else 0
        assert [r[0] for r, _ in parts] == [first, *(r[1] for r, _ in parts[:-1])]  # in row order, no gaps
        got = torch.cat([tensor for _, tensor in parts])
        (span,) = [s for t, s in needs[rank] if t.source_key == key]
        span = span or (0, data[key].shape[0])
        assert torch.equal(got, data[key][span[0] : span[1]]), (rank, key)
    assert {(r, k) for r in needs for t, _ in needs[r] for k in [t.source_key]} == set(out)


def test_a_chunk_larger_than_the_budget_is_sent_in_slices() -> None:
    """One tensor saved by one rank (one 64 KiB chunk), rounds of 8 KiB: it moves in 8 blocks, each a slice of
    the chunk within the budget for the sender and the receiver; `last_sends` says when its reader may drop it."""
    from distfinalize.write.feed import last_sends

    chunks = {"k": fsdp2_chunks("k", 512, 32, 1)}
    t = TensorPlan("w", "k", (512, 32), torch.float32, torch.float32)
    schedule = plan_exchange({0: [], 1: [(t, None)]}, chunks, 2, budget=8 * 1024)
    assert [p.rows for rnd in schedule.rounds for p in rnd.pieces] == [(i * 64, i * 64 + 64) for i in range(8)]
    assert all(len(r.transfers) == 1 and r.transfers[0].nbytes == 8 * 1024 for r in schedule.rounds)
    assert last_sends(schedule, 0) == {(chunks["k"][0], 1): (1, 8)} and last_sends(schedule, 1) == {}


@settings(max_examples=100, deadline=None)
@given(layouts())
def test_a_rank_keeps_only_its_own_transfers(layout) -> None:
    """plan_exchange(rank=r): the same rounds and tensors, with just the transfers r sends or receives."""
    needs, chunks, world, budget = layout
    full = plan_exchange(needs, chunks, world, budget)
    for rank in range(world):
        own = plan_exchange(needs, chunks, world, budget, rank)
        assert [r.pieces for r in own.rounds] == [r.pieces for r in full.rounds]
        for mine, every in zip(own.rounds, full.rounds, strict=True):
            assert mine.sent_by(rank) == every.sent_by(rank) and mine.received_by(rank) == every.received_by(rank)
            assert all(rank in (t.src, t.dst) for t in mine.transfers)


def test_pack_sends_slices_of_a_chunk_read_once() -> None:
    """A reader's send buffer: the rows each transfer carries, in order, from a chunk read (and verified) once and
    kept while a later round still slices it, let go of once its last slice is packed."""
    from distfinalize.write.feed import pack

    data = torch.arange(64 * 4, dtype=torch.float32).reshape(64, 4)
    (chunk,) = fsdp2_chunks("k", 64, 4, 1)
    reads = []

    class Reader:
        def load_chunks(self, chunks):
            for number, c in enumerate(chunks):
                reads.append(c)
                yield number, data.clone()

    kept: dict = {}
    sends = (Transfer(chunk, 0, 1, (0, 16)), Transfer(chunk, 0, 2, (16, 20)))
    buffer = pack(Reader(), sends, torch.device("cpu"), kept, {chunk})
    assert torch.equal(buffer.view(torch.float32).reshape(-1, 4), data[:20])
    assert list(kept) == [chunk] and reads == [chunk]
    buffer = pack(Reader(), (Transfer(chunk, 0, 1, (20, 64)),), torch.device("cpu"), kept, set())
    assert torch.equal(buffer.view(torch.float32).reshape(-1, 4), data[20:])
    assert kept == {} and reads == [chunk]  # the last slice came from the kept chunk, not a second read
