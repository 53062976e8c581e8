"""Metadata read once (prepare/chunks.py): only rank 0 opens a DCP checkpoint's `.metadata`; every other rank gets
the tensor table and exactly the chunk lists it reads.

The end-to-end test watches every `open` of every rank through a Python audit hook (a `sitecustomize` put on the
ranks' PYTHONPATH), so it observes the processes themselves, not a counter the library keeps; with --keep-optimizer
too. The trimming tests
are pure: they split a real DCP checkpoint's table (DTensors saved by 3 ranks, uneven row/column shards) as rank 0
does, and check each rank's part against what its plan reads.
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from support import check_ok, finalize, read_output
from torch.distributed.checkpoint import FileSystemReader

from distfinalize.errors import SourceError
from distfinalize.plan import build_plan
from distfinalize.prepare.chunks import plan_parts, reading_parts
from distfinalize.sources.dcp import DcpSource, _model_name
from distfinalize.sources.dcp_metadata import load_light
from distfinalize.sources.dcp_table import Irregular, bulk_table, checked_table, model_table
from distfinalize.write.rank import DataPath, exchange_schedule, relink, shares_for, split_schedule

pytestmark = pytest.mark.dist

HOOK = """
import os, sys

_log = os.environ.get("DISTFINALIZE_TEST_OPEN_LOG")


def _opened(event, args):
    if event == "open" and str(args[0]).endswith("/.metadata"):
        with open(f"{_log}.{os.environ.get('RANK', 'launcher')}", "a") as out:
            out.write(f"{args[0]}\\n")


if _log:
    sys.addaudithook(_opened)
"""


def watch_opens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every rank's opens of a `.metadata` logged to `<returned>.<RANK>` by the audit hook."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    monkeypatch.setenv("PYTHONPATH", str(hook))
    monkeypatch.setenv("DISTFINALIZE_TEST_OPEN_LOG", str(tmp_path / "opened"))
    return tmp_path / "opened"


@pytest.mark.parametrize("strategy", ["read", "exchange"])
def test_only_rank0_opens_the_metadata(
    fsdp2_runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, strategy: str
) -> None:
    """3 ranks over a checkpoint with optimizer state: rank 0 opens `.metadata` (to unpickle it, and to hash it
    for --resume); ranks 1 and 2 never do. The output is still bit-exact."""
    log = watch_opens(tmp_path, monkeypatch)
    run, dest = fsdp2_runs / "untied-optim", tmp_path / "out" / "model"
    args = ("--max-shard-size", "60KB", "--read-batch", "20KB", "--strategy", strategy)
    check_ok(finalize(run, dest, *args, nproc=3))
    assert sorted(p.name for p in tmp_path.glob("opened.*")) == [f"{log.name}.0"]
    tensors, _ = read_output(dest)
    reference = torch.load(run / "reference.pt")
    assert set(tensors) == set(reference)
    assert all(torch.equal(tensors[k], reference[k]) for k in tensors)


def test_keep_optimizer_reads_the_metadata_on_rank0_only(
    fsdp2_runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--keep-optimizer on 3 ranks: rank 0 reads the source `.metadata` and writes the kept optimizer's; ranks 1
    and 2 open neither, and copy their share of the optimizer files from what rank 0 sent them. The kept optimizer
    state loads with DCP equal to the source's."""
    log = watch_opens(tmp_path, monkeypatch)
    run, dest = fsdp2_runs / "untied-optim", tmp_path / "out"
    check_ok(finalize(run, dest, "--max-shard-size", "60KB", "--keep-checkpoint", "--keep-optimizer", nproc=3))
    assert sorted(p.name for p in tmp_path.glob("opened.*")) == [f"{log.name}.0"]
    kept, source_dir = dest / "checkpoints" / "checkpoint-3" / "optimizer", run / "checkpoints" / "checkpoint-3"
    opened = set(Path(f"{log}.0").read_text().split())
    assert str(source_dir / ".metadata") in opened and any(p.endswith("/optimizer/.metadata") for p in opened)
    kept_md = FileSystemReader(str(kept)).read_metadata()
    source_md = FileSystemReader(str(source_dir)).read_metadata()
    assert set(kept_md.state_dict_metadata) == {k for k in source_md.state_dict_metadata if k.startswith("optim.")}
    assert len(list(kept.glob("*.distcp"))) == 2  # the two training ranks' files: copied by ranks 0 and 1
    tensors = {k: m for k, m in kept_md.state_dict_metadata.items() if hasattr(m, "size")}

    def load(path: Path) -> dict[str, torch.Tensor]:
        state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in tensors.items()}
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
        return state

    ours, theirs = load(kept), load(source_dir)
    assert tensors and all(torch.equal(ours[k], theirs[k]) for k in tensors)


@pytest.mark.parametrize("world", [2, 3, 5])
def test_read_each_rank_receives_exactly_the_chunks_its_plan_reads(dtensor_run: Path, world: int) -> None:
    full = DcpSource(dtensor_run / "checkpoint-0")
    plan = build_plan(full.tensors, dtype=None, max_shard_size=20_000, world_size=world)
    parts = plan_parts(plan)(full)
    for rank in range(world):
        keys = {k for share in shares_for(plan, rank) for t, _ in share.parts for k in t.source_keys}  # what it writes
        assert set(parts[rank]) == keys
        assert {(k, c) for k, cs in parts[rank].items() for c in cs} == {(k, c) for k in keys for c in full.table[k]}
        mine = DcpSource(full.path, shared=full.shared)  # as a rank other than 0 opens it: no chunks
        mine.install(parts[rank])
        got, want = mine.reader().read(sorted(keys)), full.reader().read(sorted(keys))
        assert all(torch.equal(got[k], want[k]) for k in keys)
        others = sorted(set(full.table) - keys)
        if others:
            with pytest.raises(SourceError, match="no chunk list"):
                mine.reader().read(others[:1])


@pytest.mark.parametrize("world", [2, 3, 5])
def test_exchange_each_rank_receives_its_files_chunks_and_its_part_of_the_schedule(
    dtensor_run: Path, world: int
) -> None:
    full = DcpSource(dtensor_run / "checkpoint-0")
    plan = build_plan(full.tensors, dtype=None, max_shard_size=20_000, world_size=world, row_cuts=False)
    parts = reading_parts(world)(full)
    path = DataPath("exchange", 4_000)
    split = split_schedule(exchange_schedule(plan, full, path), world)
    assert len(split[0].rounds) > 1
    for rank in range(world):
        own = exchange_schedule(plan, full, path, rank=rank)  # what the rank would build with the whole table
        part = relink(split[rank], plan, rank)
        assert len(part.rounds) == len(own.rounds)
        for got, want in zip(part.rounds, own.rounds, strict=True):
            assert sorted(map(repr, got.transfers)) == sorted(map(repr, want.transfers))
            mine, built = got.pieces_for(rank), want.pieces_for(rank)
            assert [(p.rows, p.nbytes) for p in mine] == [(p.rows, p.nbytes) for p in built]
            assert all(a.tensor is b.tensor for a, b in zip(mine, built, strict=True))  # its own TensorPlan objects
        sends = {(t.chunk.key, t.chunk.offsets) for r in part.rounds for t in r.sent_by(rank)}
        assert sends == {(k, c.offsets) for k, cs in parts[rank].items() for c in cs}  # every chunk it holds


def test_the_bulk_check_builds_the_per_chunk_tables_table(dtensor_run: Path) -> None:
    """DTensors saved by 3 ranks (uneven row and column shards): the bulk check accepts the real metadata and builds
    exactly the per-chunk check's table, also when the storage index lists the entries in another order than the
    chunk lists (joined by offsets then)."""
    path = dtensor_run / "checkpoint-0"
    loaded = load_light(path)
    shared, _ = model_table(loaded, path, _model_name)
    tensors = list(shared.tensors)
    assert any(len(md.chunks) > 1 for md in loaded.state_dict_metadata.values() if hasattr(md, "chunks"))
    for order in (list, lambda items: list(reversed(items))):
        loaded.storage_data = dict(order(list(loaded.storage_data.items())))
        assert bulk_table(loaded, tensors) == checked_table(loaded, tensors, path)


def _edits(loaded) -> list:
    """Ways to corrupt (or merely reorder) light metadata: each takes the loaded objects and changes them."""
    model = [k for k in loaded.state_dict_metadata if k.startswith("model.")]
    entries = lambda key: [(i, v) for i, v in loaded.storage_data.items() if i["fqn"] == key]  # noqa: E731
    chunks = lambda key: loaded.state_dict_metadata[key].chunks  # noqa: E731
    big = max(model, key=lambda k: len(chunks(k)))

    def put(key, field, value):
        return lambda: chunks(key)[0].__setitem__(field, value)

    def entry(key, field, value):
        return lambda: entries(key)[0][1].__setitem__(field, value)

    def index(key, field, value):
        return lambda: entries(key)[0][0].__setitem__(field, value)

    return [
        lambda: chunks(big).reverse(),
        lambda: random.Random(0).shuffle(chunks(big)),
        put(big, "offsets", (True, *chunks(big)[0]["offsets"][1:])),
        put(big, "offsets", (-1, *chunks(big)[0]["offsets"][1:])),
        put(big, "sizes", (10**9, *chunks(big)[0]["sizes"][1:])),
        put(big, "sizes", list(chunks(big)[0]["sizes"])),
        lambda: chunks(big).pop(),
        lambda: chunks(big).append(chunks(big)[0]),
        lambda: chunks(big)[0].pop("sizes"),
        entry(big, "length", -1),
        entry(big, "offset", 2**70),
        entry(big, "relative_path", "../__0_0.distcp"),
        entry(big, "transform_descriptors", ["zstd"]),
        index(big, "offset", [0] * len(chunks(big)[0]["offsets"])),
        index(big, "fqn", model[0] if model[0] != big else model[-1]),
        index(big, "fqn", ["unhashable"]),
        lambda: loaded.storage_data.pop(entries(big)[0][0]),
        lambda: loaded.storage_data.update({type(entries(big)[0][0])(entries(big)[0][0]): entries(big)[0][1]}),
    ]


def test_the_bulk_check_never_accepts_what_the_per_chunk_check_refuses(dtensor_run: Path) -> None:
    """Each edit of real metadata (uneven DTensor shards): either both checks accept it and build the same table,
    or the bulk check hands it over (Irregular) and the per-chunk check decides."""
    path = dtensor_run / "checkpoint-0"
    pristine = pickle.dumps(load_light(path))
    shared, _ = model_table(pickle.loads(pristine), path, _model_name)
    tensors = list(shared.tensors)
    outcomes = set()
    for n in range(len(_edits(pickle.loads(pristine)))):
        loaded = pickle.loads(pristine)
        _edits(loaded)[n]()  # the n-th edit, on a fresh copy
        try:
            want = checked_table(loaded, tensors, path)
        except SourceError:
            want = None
        try:
            got = bulk_table(loaded, tensors)
        except Irregular:
            got = "irregular"
        assert got == "irregular" or got == want, n
        outcomes.add("refused" if want is None else "irregular" if got == "irregular" else "accepted")
    assert outcomes == {"refused", "accepted", "irregular"}
