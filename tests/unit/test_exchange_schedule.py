"""The exchange schedule: every needed chunk delivered exactly once, in write order, within the round budget."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distfinalize.plan import FilePlan, TensorPlan
from distfinalize.sources import SourceChunk
from distfinalize.write.exchange import assign_readers, describe, plan_exchange
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
    delivered: dict[int, list[TensorPlan]] = {r: [] for r in range(world)}
    moved: list[tuple[str, int, int]] = []
    for rnd in schedule.rounds:
        assert rnd.tensors, "every round makes progress"
        for rank in range(world):
            delivered[rank] += rnd.tensors_for(rank)
            got, sent = rnd.received_by(rank), rnd.sent_by(rank)
            # a rank over budget in a round carries a single tensor (one too big to share a round)
            if sum(t.chunk.nbytes for t in got) > budget:
                assert len(rnd.tensors_for(rank)) == 1
            if sum(t.chunk.nbytes for t in sent) > budget:
                assert len({t.chunk.key for t in sent}) == 1
            assert sum(rnd.split(sent, world, "dst")) == sum(t.chunk.nbytes for t in sent)
        for move in rnd.transfers:
            assert move.src == schedule.readers[move.chunk.file]  # read by the rank the file was given to
            assert any(t.source_key == move.chunk.key for t in rnd.tensors_for(move.dst))  # same round as its tensor
            moved.append((move.chunk.key, move.chunk.index, move.dst))
    assert delivered == {r: list(needs[r]) for r in range(world)}  # every tensor once, in write order
    wanted = [(c.key, c.index, r) for r in range(world) for t in needs[r] for c in chunks[t.source_key]]
    assert sorted(moved) == sorted(wanted)  # every chunk exactly once to its writer
    read = describe(schedule)["bytes_read_per_rank"]
    assert sum(read) == sum(chunks[k][i].nbytes for k, i, _ in wanted)


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


def test_tensors_over_the_budget_share_rounds() -> None:
    """Row-sharded like FSDP2 (every rank wrote a slice of every tensor), each tensor twice the budget: the budget
    holds per receiver and per sender's slice, so two such tensors move per round, not one (the ideal: 2 rounds)."""
    world = 4
    chunks = {
        f"k{i}": tuple(SourceChunk(f"k{i}", w, f"__{w}_0.distcp", w, (w * 25,), (25,), 100) for w in range(world))
        for i in range(world)
    }
    tensors = [TensorPlan(f"w{i}", f"k{i}", (100,), torch.float32, torch.float32) for i in range(world)]
    schedule = plan_exchange({r: [tensors[r]] for r in range(world)}, chunks, world, budget=200)
    assert [sorted(r for r, _ in rnd.tensors) for rnd in schedule.rounds] == [[0, 1], [2, 3]]
    for rnd in schedule.rounds:
        assert all(sum(t.chunk.nbytes for t in rnd.sent_by(rank)) <= 200 for rank in range(world))


@settings(max_examples=100, deadline=None)
@given(layouts())
def test_a_rank_keeps_only_its_own_transfers(layout) -> None:
    """plan_exchange(rank=r): the same rounds and tensors, with just the transfers r sends or receives."""
    needs, chunks, world, budget = layout
    full = plan_exchange(needs, chunks, world, budget)
    for rank in range(world):
        own = plan_exchange(needs, chunks, world, budget, rank)
        assert [r.tensors for r in own.rounds] == [r.tensors for r in full.rounds]
        for mine, every in zip(own.rounds, full.rounds, strict=True):
            assert mine.sent_by(rank) == every.sent_by(rank) and mine.received_by(rank) == every.received_by(rank)
            assert all(rank in (t.src, t.dst) for t in mine.transfers)
