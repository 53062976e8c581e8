"""The exchange schedule: every needed chunk delivered exactly once, in write order, within the round budget."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distfinalize.plan import FilePlan, TensorPlan
from distfinalize.sources import SourceChunk
from distfinalize.write.exchange import Piece, assign_readers, describe, plan_exchange
from distfinalize.write.overlap import lane_order


@st.composite
def layouts(draw: st.DrawFn):
    """Tensors split into row chunks over the files of `saved` training ranks, needed by `world` writers."""
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
    owners = [draw(st.integers(0, world - 1)) for _ in tensors]
    needs = {r: [t for t, o in zip(tensors, owners, strict=True) if o == r] for r in range(world)}
    budget = draw(st.integers(1, 800))
    return needs, chunks, world, budget


@settings(max_examples=200, deadline=None)
@given(layouts())
def test_schedule_delivers_every_chunk_once_within_budget(layout) -> None:
    needs, chunks, world, budget = layout
    schedule = plan_exchange(needs, chunks, world, budget)
    assert schedule == plan_exchange(needs, chunks, world, budget)  # pure and deterministic
    delivered: dict[int, list[Piece]] = {r: [] for r in range(world)}
    moved: list[tuple[str, int, int]] = []
    for rnd in schedule.rounds:
        assert rnd.pieces, "every round makes progress"
        for rank in range(world):
            mine = rnd.pieces_for(rank)
            delivered[rank] += mine
            got, sent = rnd.received_by(rank), rnd.sent_by(rank)
            # a rank over budget in a round carries a single piece (one that cannot be cut smaller)
            if sum(t.chunk.nbytes for t in got) > budget:
                assert len(mine) == 1
            if sum(t.chunk.nbytes for t in sent) > budget:
                assert len({(t.dst, t.chunk.key, owner(rnd, t).rows) for t in sent}) == 1
            assert sum(rnd.split(sent, world, "dst")) == sum(t.chunk.nbytes for t in sent)
        for move in rnd.transfers:
            assert move.src == schedule.readers[move.chunk.file]  # read by the rank the file was given to
            owner(rnd, move)  # delivered in the same round as its piece
            moved.append((move.chunk.key, move.chunk.index, move.dst))
    for rank in range(world):  # every tensor once, in write order, its blocks in row order covering every row
        assert [p.tensor for p in delivered[rank] if p.rows is None or p.rows[0] == 0] == list(needs[rank])
        for t in needs[rank]:
            blocks = [p.rows for p in delivered[rank] if p.tensor is t]
            if blocks != [None]:
                assert [b[0] for b in blocks] == [0, *(b[1] for b in blocks[:-1])] and blocks[-1][1] == t.shape[0]
    wanted = [(c.key, c.index, r) for r in range(world) for t in needs[r] for c in chunks[t.source_key]]
    assert sorted(moved) == sorted(wanted)  # every chunk exactly once to its writer
    read = describe(schedule)["bytes_read_per_rank"]
    assert sum(read) == sum(chunks[k][i].nbytes for k, i, _ in wanted)


def owner(rnd, move) -> Piece:
    """The one piece of the round that a transfer belongs to."""
    (piece,) = [p for p in rnd.pieces_for(move.dst) if p.holds(move.chunk)]
    return piece


def test_budget_splits_rounds() -> None:
    chunks = {f"k{i}": (SourceChunk(f"k{i}", 0, "__0_0.distcp", 0, (0,), (10,), 40),) for i in range(4)}
    tensors = [TensorPlan(f"w{i}", f"k{i}", (10,), torch.float32, torch.float32) for i in range(4)]
    schedule = plan_exchange({0: tensors[:2], 1: tensors[2:]}, chunks, 2, budget=80)
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
    schedule = plan_exchange({r: [tensors[r]] for r in range(world)}, chunks, world, budget=200)
    for rnd in schedule.rounds:
        for rank in range(world):
            assert sum(t.chunk.nbytes for t in rnd.sent_by(rank)) <= 200
            assert sum(t.chunk.nbytes for t in rnd.received_by(rank)) <= 200
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
    schedule = plan_exchange({0: [t]}, chunks, 2, budget=40 * 1024)
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
    needs = {r: [t for i, t in enumerate(tensors) if (i * 7 + seed) % world == r] for r in range(world)}
    budget = budget_rows * 64 * 4
    schedule = plan_exchange(needs, chunks, world, budget)
    sent, received = [0] * world, [0] * world
    for rnd in schedule.rounds:
        for t in rnd.transfers:
            sent[t.src] += t.chunk.nbytes
            received[t.dst] += t.chunk.nbytes
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
    needs = {0: [plans["a"], plans["c"]], 1: [plans["b"]], 2: []}
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
                torch.cat([stored(data[m.chunk.key], m.chunk) for m in receives])
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


def stored(tensor: torch.Tensor, chunk: SourceChunk) -> torch.Tensor:
    """A chunk's bytes as a rank reads them: its part of the tensor, contiguous."""
    part = tensor
    for dim, (offset, size) in enumerate(zip(chunk.offsets, chunk.sizes, strict=True)):
        part = part.narrow(dim, offset, size)
    return part.contiguous().reshape(-1).view(torch.uint8)


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
