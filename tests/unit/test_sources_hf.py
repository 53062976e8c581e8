"""The safetensors and .bin sources read only what they are asked for: the files holding the tensors, and in a
safetensors file only those tensors' byte ranges. Files written by the real libraries (safetensors,
huggingface_hub's save_torch_state_dict)."""

from __future__ import annotations

import builtins
from pathlib import Path

import pytest
import torch
from huggingface_hub import save_torch_state_dict

from distfinalize.sources import safetensors_dir, torchbin
from distfinalize.sources.safetensors_dir import SafetensorsSource
from distfinalize.sources.torchbin import TorchBinSource


def state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = {f"layers.{i}.weight": torch.randn(64, 32, generator=gen) for i in range(6)}
    out["norm.weight"] = torch.randn(32, generator=gen).to(torch.bfloat16)
    return out


@pytest.fixture
def model_dir(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    save_torch_state_dict(state(), tmp_path, max_shard_size="20KB", safe_serialization=request.param == "safetensors")
    return tmp_path


@pytest.mark.parametrize("model_dir", ["safetensors"], indirect=True)
def test_safetensors_reads_only_the_asked_byte_ranges(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = SafetensorsSource(model_dir)
    assert {t.name: (t.shape, t.dtype) for t in source.tensors} == {
        k: (tuple(v.shape), v.dtype) for k, v in state().items()
    }
    opened, read = [], []

    def spy_open(path, *args, **kwargs):
        file = builtins.open(path, *args, **kwargs)  # noqa: SIM115  (handed to the reader, which closes it)
        opened.append(Path(path).name)
        inner = file.readinto

        def readinto(buffer):
            n = inner(buffer)
            read.append(n)
            return n

        file.readinto = readinto
        return file

    monkeypatch.setattr(safetensors_dir, "open", spy_open, raising=False)
    keys = ["layers.4.weight", "norm.weight"]
    got = source.reader().read(keys)
    for key in keys:
        assert torch.equal(got[key], state()[key])
    assert sorted(opened) == sorted({source.pieces[k][0].file for k in keys})
    assert sum(read) == 64 * 32 * 4 + 32 * 2


@pytest.mark.parametrize("model_dir", ["bin"], indirect=True)
def test_bin_maps_only_the_files_it_needs(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = TorchBinSource(model_dir)
    assert len(set(source.files.values())) == 3
    loads = []
    real = torchbin.load_weights

    def spy(path: Path, map_location: str, mmap: bool) -> dict:
        loads.append((path.name, map_location, mmap))
        return real(path, map_location, mmap)

    monkeypatch.setattr(torchbin, "load_weights", spy)
    got = source.reader().read(["layers.1.weight"])
    assert torch.equal(got["layers.1.weight"], state()["layers.1.weight"])
    assert loads == [(source.files["layers.1.weight"], "cpu", True)]


def test_bin_refusals(tmp_path: Path) -> None:
    """A legacy (non-zip) torch.save file, and one pickling an object besides tensors: one SourceError each,
    naming the file (and the class)."""
    from distfinalize.errors import SourceError

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save(state(), legacy / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(SourceError, match=r"legacy \(non-zip\) torch.save file"):
        TorchBinSource(legacy)
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    torch.save({**state(), "path": Path("/etc")}, hostile / "pytorch_model.bin")
    with pytest.raises(SourceError, match="holds an object of class pathlib"):
        TorchBinSource(hostile)


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_rows_read_in_blocks_equal_the_whole_tensor(tmp_path: Path, safe: bool) -> None:
    """read_rows gives exactly the rows of the whole tensor, for any block (what row-block streaming reads)."""
    tensors = {"a.weight": torch.randn(37, 5, dtype=torch.bfloat16), "b.weight": torch.randn(11, 3)}
    save_torch_state_dict(tensors, tmp_path, safe_serialization=safe)
    source = (SafetensorsSource if safe else TorchBinSource)(tmp_path)
    reader = source.reader()
    for key, whole in tensors.items():
        assert reader.row_cuts(key) is None
        for start, stop in [(0, 1), (3, 9), (whole.shape[0] - 2, whole.shape[0]), (0, whole.shape[0])]:
            assert torch.equal(reader.read_rows(key, start, stop), whole[start:stop]), (key, start, stop)


def test_copy_rows_places_pieces_of_any_sharding() -> None:
    """Pieces split along rows and columns: the rows of a block assembled from the pieces that hold them."""
    from distfinalize.sources import copy_rows, overlapping, row_pieces

    whole = torch.arange(12 * 6).view(12, 6)
    pieces = [((r, c), (4, 3)) for r in (0, 4, 8) for c in (0, 3)]
    assert row_pieces(pieces) == [0, 4, 8]
    for start, stop in [(0, 4), (2, 10), (11, 12)]:
        out = torch.empty(stop - start, 6, dtype=whole.dtype)
        for offsets, sizes in pieces:
            if overlapping(offsets, sizes, start, stop):
                data = whole[offsets[0] : offsets[0] + sizes[0], offsets[1] : offsets[1] + sizes[1]]
                copy_rows(out, start, offsets, data)
        assert torch.equal(out, whole[start:stop])
