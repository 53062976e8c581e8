"""The DCP chunk table (sources/dcp_table.py) from `.metadata` loaded by the light unpickler: the same globals
refused as DCP's own loader, every chunk list type-checked, optimizer entries counted and not kept. A real
checkpoint's table is built by the bulk check alone; anything malformed goes to the per-chunk check, which names
it."""

from __future__ import annotations

import gc
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, MetadataIndex

from distfinalize.errors import SourceError
from distfinalize.sources import dcp_table
from distfinalize.sources.dcp import DcpSource
from distfinalize.sources.dcp_metadata import load_metadata, storage_regular
from distfinalize.sources.dcp_table import in_files, trim


def saved(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    state = {
        "model": {"w": torch.randn(64, 48, generator=torch.Generator().manual_seed(0)), "b": torch.arange(48.0)},
        "optim": {"step": torch.tensor(3.0), "w.exp_avg": torch.zeros(64, 48)},
    }
    dcp.save(state, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)
    return tmp_path / "ckpt", state["model"]


def per_chunk_check_ran(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Records each run of the per-chunk check (dcp_table.checked_table), which still runs."""
    ran, checked = [], dcp_table.checked_table

    def spy(loaded, tensors, path):
        ran.append(path)
        return checked(loaded, tensors, path)

    monkeypatch.setattr(dcp_table, "checked_table", spy)
    return ran


def test_model_tensors_kept_optimizer_entries_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, model = saved(tmp_path)
    ran = per_chunk_check_ran(monkeypatch)
    source = DcpSource(path)
    assert ran == []  # a real checkpoint passes the bulk check
    assert storage_regular(load_metadata(path).storage_data)  # and the strict loader's bulk check
    assert {t.name: (t.shape, t.dtype) for t in source.tensors} == {
        k: (tuple(v.shape), v.dtype) for k, v in model.items()
    }
    assert source.info.skipped == 2 and set(source.table) == {"model.w", "model.b"}  # optimizer: counted only
    assert source.files() == {"__0_0.distcp": 0} and source.info.saved_world_size == 1
    got = source.reader().read(["model.w", "model.b"])
    assert torch.equal(got["model.w"], model["w"]) and torch.equal(got["model.b"], model["b"])
    assert gc.isenabled()  # the collector paused for the load only
    assert trim(source.table, ["model.b", "nope"]) == {"model.b": source.table["model.b"]}
    assert in_files(source.table, ["__1_0.distcp"]) == {}


def _w(md: Metadata):
    return md.state_dict_metadata["model.w"]


BROKEN: dict[str, tuple[Callable[[Metadata], None], str]] = {
    "chunk list not a list": (lambda md: setattr(_w(md), "chunks", "abc"), "has no chunk list"),
    "chunk not a chunk": (lambda md: _w(md).chunks.append(7), "chunk 1 of 'model.w' is not a chunk"),
    "offsets a list": (lambda md: setattr(_w(md).chunks[0], "offsets", [0, 0]), "is not a chunk"),
    "offsets of strings": (lambda md: _put(_w(md).chunks[0], ("0", 0)), "lies outside"),
    "sizes past the tensor": (lambda md: setattr(_w(md).chunks[0], "sizes", torch.Size([65, 48])), "lies outside"),
    "wrong rank": (lambda md: setattr(_w(md).chunks[0], "sizes", torch.Size([64])), "lies outside"),
    "chunk with no storage": (
        lambda md: _w(md).chunks.append(ChunkStorageMetadata(torch.Size([32, 0]), torch.Size([1, 1]))),
        "no storage entry",
    ),
    "storage with no chunk": (
        lambda md: md.storage_data.update({MetadataIndex("model.w", (1, 0)): next(iter(md.storage_data.values()))}),
        "that no chunk lists",
    ),
    "size not ints": (lambda md: setattr(_w(md), "size", ("64", 48)), "has the size"),
}


def _put(chunk: ChunkStorageMetadata, offsets: tuple) -> None:
    chunk.offsets = offsets  # a tuple of strings where DCP writes a torch.Size of ints


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_malformed_chunk_lists_are_one_source_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    path, _ = saved(tmp_path)
    ran = per_chunk_check_ran(monkeypatch)
    md = load_metadata(path)
    change, message = BROKEN[case]
    change(md)
    (path / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(SourceError, match=message) as caught:
        DcpSource(path)
    assert str(path / ".metadata") in str(caught.value.where)
    assert ran == ([] if case == "size not ints" else [path])  # the bulk check refused it (a size: checked before)


class Payload:
    def __reduce__(self):
        return (os.system, ("true",))


def test_the_light_loader_refuses_what_the_strict_one_refuses(tmp_path: Path) -> None:
    path, _ = saved(tmp_path)
    md = load_metadata(path)
    md.planner_data["model.w"] = Payload()
    (path / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(SourceError, match=r"refusing to load DCP metadata: it names 'posix\.system'"):
        DcpSource(path)
