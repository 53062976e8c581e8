"""Several ranks per output file: the plan's cut of the job's bytes into per-rank pieces (pure), and the writer
that writes a piece in place, with its own sha256."""

from __future__ import annotations

import hashlib
import itertools
import random
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from distfinalize.commands.hfdir import pieces_cover
from distfinalize.commit.finish import file_checksums
from distfinalize.plan import Plan, build_plan, file_layout, piece_parts, tensor_spans
from distfinalize.sources import TensorMeta
from distfinalize.write.rank import Share, WrittenFile, record_progress, reusable, share_steps, shares_for
from distfinalize.write.writer import DIRECT_ALIGNMENT, SafetensorsWriter, StageBuffer, range_digests


def metas(shapes: list[tuple[int, ...]], dtype: torch.dtype = torch.float32) -> list[TensorMeta]:
    return [TensorMeta(f"key{i}", f"w{i:03d}", s, dtype) for i, s in enumerate(shapes)]


def check_cover(plan: Plan) -> None:
    """Every byte of every file's data region in exactly one piece, in order, the first at 0."""
    for f in plan.files:
        position = 0
        for p in f.ranges:
            assert p.start == position and p.stop >= p.start and 0 <= p.rank < plan.world_size
            position = p.stop
        assert position == f.nbytes
        assert f.rank == f.ranges[0].rank  # the header writer holds the first piece
        assert len({p.rank for p in f.ranges}) == len(f.ranges)  # a rank's share is contiguous: one piece per file
    assert sum(plan.bytes_for(r) for r in range(plan.world_size)) == plan.total_size


def check_boundaries(plan: Plan, row_cuts: bool = True) -> None:
    """A cut falls between tensors, or between rows of a tensor that may be cut (never inside a quantized one)."""
    for f in plan.files:
        spans = tensor_spans(f, file_layout(f, plan.metadata))
        for p in f.ranges[1:]:
            inside = [(s, e, t) for s, e, t in spans if s < p.start < e]
            if not inside:
                continue
            ((s, e, t),) = inside
            assert row_cuts and t.row_cuttable, f"cut at {p.start} inside {t.name}"
            assert (p.start - s) % ((e - s) // t.shape[0]) == 0, "a cut inside a row"


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 300), st.integers(1, 40)), min_size=1, max_size=30),
    st.integers(1, 70),
    st.integers(2_000, 200_000),
)
def test_every_byte_in_exactly_one_piece(shapes: list[tuple[int, int]], world: int, shard: int) -> None:
    plan = build_plan(metas(shapes), dtype=torch.bfloat16, max_shard_size=shard, world_size=world)
    check_cover(plan)
    check_boundaries(plan)
    for f in plan.files:  # the parts of its pieces hold every row of every tensor once
        laid = file_layout(f, plan.metadata)
        rows: dict[str, list[tuple[int, int]]] = {}
        for p in f.ranges:
            for t, block in piece_parts(f, p, laid):
                rows.setdefault(t.name, []).append(block or (0, t.shape[0]))
        for t in f.tensors:
            got = sorted(rows[t.name])
            assert got[0][0] == 0 and got[-1][1] == t.shape[0]
            assert all(a[1] == b[0] for a, b in itertools.pairwise(got))


@pytest.mark.parametrize("world", [2, 7, 64, 500])
def test_the_same_cut_on_every_rank(world: int) -> None:
    tensors = metas([(i * 13 % 97 + 3, 64) for i in range(60)])
    a = build_plan(tensors, dtype=torch.bfloat16, max_shard_size=50_000, world_size=world)
    b = build_plan(list(tensors), dtype=torch.bfloat16, max_shard_size=50_000, world_size=world)
    assert a == b


@pytest.mark.parametrize("world", [8, 64, 512])
def test_bytes_balanced_and_no_rank_idle(world: int) -> None:
    """A Llama-shaped model in one 5GB-sharded plan: every rank within 5% of the mean, and busy."""
    shapes = [(128256, 4096)] + [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096)] * 32 + [(128256, 4096)]
    plan = build_plan(metas(shapes), dtype=torch.bfloat16, max_shard_size=5 * 10**9, world_size=world)
    loads = [plan.bytes_for(r) for r in range(world)]
    assert max(loads) / (sum(loads) / world) <= 1.05
    assert min(loads) > 0
    check_cover(plan)
    check_boundaries(plan)


def test_files_stay_whole_when_they_balance() -> None:
    plan = build_plan(metas([(64, 64)] * 12), dtype=None, max_shard_size=64 * 64 * 4, world_size=4)
    assert [len(f.ranges) for f in plan.files] == [1] * 12
    assert [plan.bytes_for(r) for r in range(4)] == [3 * 64 * 64 * 4] * 4


def test_between_tensors_only_without_row_cuts() -> None:
    """--strategy exchange moves whole tensors: its plan never cuts a tensor, one tensor to one rank."""
    plan = build_plan(metas([(100, 64)] * 8), dtype=None, max_shard_size=10**9, world_size=3, row_cuts=False)
    check_cover(plan)
    check_boundaries(plan, row_cuts=False)
    assert plan.files[0].shared
    owners = [[t.name for s in shares_for(plan, r) for t, rows in s.parts if rows is None] for r in range(3)]
    assert sorted(n for names in owners for n in names) == [f"w{i:03d}" for i in range(8)]  # each whole, once


def test_no_empty_piece_when_a_tensor_outweighs_several_shares() -> None:
    """Whole tensors only, one far bigger than a rank's share: several cuts fall on the same place, and the ranks
    between them write nothing rather than an empty piece (the write path has no tensor to feed it)."""
    shapes = [(4000, 64), *[(10, 64)] * 6]
    plan = build_plan(metas(shapes), dtype=None, max_shard_size=10**9, world_size=8, row_cuts=False)
    check_cover(plan)
    assert all(p.nbytes > 0 for f in plan.files for p in f.ranges)
    assert all(share.parts for r in range(8) for share in shares_for(plan, r))
    assert sum(1 for r in range(8) if plan.bytes_for(r) == 0) > 0  # the ranks the big tensor crowds out


def test_quantized_weights_stay_whole() -> None:
    tensors = [TensorMeta(f"k{i}", f"layers.{i}.proj.weight", (256, 128), torch.float32) for i in range(6)]
    quant = {t.name: "fp8" for t in tensors}
    plan = build_plan(tensors, dtype=torch.bfloat16, max_shard_size=10**9, world_size=5, quant=quant)
    check_cover(plan)
    check_boundaries(plan)
    assert plan.files[0].shared


def test_steps_of_a_cut_tensor_carry_its_rows() -> None:
    plan = build_plan(metas([(100, 16)]), dtype=None, max_shard_size=10**9, world_size=4)
    blocks = [step.rows for r in range(4) for step in share_steps(shares_for(plan, r), 2)]
    assert blocks == [(0, 25), (25, 50), (50, 75), (75, 100)]


def write_pieces(path: Path, plan: Plan, tensors: dict[str, torch.Tensor], stage: bool, order: list[int]) -> dict:
    """Each rank's pieces written by their own writer, ranks in `order`; the sha256 of each piece's bytes."""
    digests = {}
    for rank in order:
        for share in shares_for(plan, rank):
            writer = SafetensorsWriter(
                path, share.layout, StageBuffer(2 * DIRECT_ALIGNMENT) if stage else None, share.span
            )
            for t, rows in share.parts:
                if rows is None:
                    writer.write(t.name, tensors[t.name])
                else:
                    writer.write(t.name, tensors[t.name][rows[0] : rows[1]], row=rows[0])
            digests[share.span] = writer.close()
    return digests


@pytest.mark.parametrize("stage", [False, True])
def test_pieces_written_by_several_writers_make_save_files_bytes(tmp_path: Path, stage: bool) -> None:
    """Unaligned piece boundaries, O_DIRECT staging smaller than a piece, writers in any order: the file is
    byte-identical to save_file's and each piece's digest is that of its bytes."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(333, 7), (1000, 5), (3,), (77, 3)]
    metas_ = metas(shapes)
    tensors = {m.name: torch.randn(m.shape, generator=gen) for m in metas_}
    plan = build_plan(metas_, dtype=None, max_shard_size=10**9, world_size=5)
    assert plan.files[0].shared
    order = list(range(5))
    random.Random(1).shuffle(order)
    digests = write_pieces(tmp_path / "model.safetensors", plan, tensors, stage, order)
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    data = (tmp_path / "model.safetensors").read_bytes()
    assert data == (tmp_path / "ref.safetensors").read_bytes()
    for (start, stop), digest in digests.items():
        assert digest == hashlib.sha256(data[start:stop]).hexdigest()
    bounds = sorted({b for span in digests for b in span})
    whole, per_range = range_digests(tmp_path / "model.safetensors", bounds, block=100)
    assert whole == hashlib.sha256(data).hexdigest()
    assert per_range == [digests[(a, b)] for a, b in itertools.pairwise(bounds)]
    assert all(torch.equal(load_file(tmp_path / "model.safetensors")[k], v) for k, v in tensors.items())


def test_a_piece_left_short_is_caught(tmp_path: Path) -> None:
    plan = build_plan(metas([(100, 16)]), dtype=None, max_shard_size=10**9, world_size=2)
    share = shares_for(plan, 1)[0]
    writer = SafetensorsWriter(tmp_path / "model.safetensors", share.layout, None, share.span)
    t, rows = share.parts[0]
    writer.write(t.name, torch.zeros(rows[1] - rows[0] - 1, 16), row=rows[0])
    with pytest.raises(RuntimeError, match="bytes of"):
        writer.close()
    outside = SafetensorsWriter(tmp_path / "model.safetensors", share.layout, None, share.span)
    with pytest.raises(ValueError, match="outside"):
        outside.write(t.name, torch.zeros(1, 16), row=0)
    outside.abort()


def test_the_manifest_records_each_piece_and_resume_checks_it(tmp_path: Path) -> None:
    metas_ = metas([(64, 8), (64, 8)])
    tensors = {m.name: torch.randn(m.shape) for m in metas_}
    plan = build_plan(metas_, dtype=None, max_shard_size=10**9, world_size=3)
    path = tmp_path / "model.safetensors"
    write_pieces(path, plan, tensors, True, [0, 1, 2])
    progress = tmp_path / ".progress"
    progress.mkdir()
    shares: list[Share] = [s for r in range(3) for s in shares_for(plan, r)]
    written = []
    for s in shares:
        start, stop = s.span
        data = path.read_bytes()[start:stop]
        w = WrittenFile(
            s.file.filename,
            s.piece.rank,
            stop - start,
            len(s.parts),
            hashlib.sha256(data).hexdigest(),
            offset=start,
            file_size=s.layout.size,
        )
        record_progress(progress, w)
        written.append(w)
    entry = file_checksums(tuple(written))["model.safetensors"]
    assert entry["size"] == path.stat().st_size and "sha256" not in entry
    assert pieces_cover(entry["pieces"], entry["size"])
    assert [tuple(p[:2]) for p in entry["pieces"]] == sorted(s.span for s in shares)
    assert all(reusable(s, tmp_path, progress) is not None for s in shares)
    with open(path, "r+b") as f:  # one byte of the middle piece flipped: only that piece is written again
        f.seek(shares[1].span[0] + 3)
        byte = f.read(1)
        f.seek(shares[1].span[0] + 3)
        f.write(bytes([byte[0] ^ 1]))
    assert [reusable(s, tmp_path, progress) is not None for s in shares] == [True, False, True]


def test_a_file_one_rank_wrote_keeps_its_whole_sha256() -> None:
    one = WrittenFile("a.safetensors", 0, 100, 2, "ab" * 32)
    assert file_checksums((one,)) == {"a.safetensors": {"size": 100, "sha256": "ab" * 32}}
    assert not pieces_cover([[0, 50, "x"], [60, 100, "y"]], 100)
    assert not pieces_cover([[0, 50, "x"]], 100)


def test_describe_and_the_dry_run_table_show_the_pieces() -> None:
    from distfinalize.commands.finalize import format_plan
    from distfinalize.plan import describe

    plan = build_plan(metas([(100, 16)] * 3), dtype=None, max_shard_size=10**9, world_size=4)
    (file,) = describe(plan)["files"]
    assert file["rank"] == 0 and [p["rank"] for p in file["pieces"]] == [0, 1, 2, 3]
    assert [p["bytes"] for p in file["pieces"]] == [[p.start, p.stop] for p in plan.files[0].ranges]
    assert describe(plan)["bytes_per_rank"] == [plan.bytes_for(r) for r in range(4)] == [4800] * 4
    table = format_plan(plan)
    assert "model.safetensors   0-3" in table and "  piece: rank 3 bytes [14400, 19200)" in table
