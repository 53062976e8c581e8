"""Where ZeRO puts each parameter's elements, the files a tag folder must (not) have, and the byte reader."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from distfinalize.errors import SourceError
from distfinalize.sources.deepspeed import meta as ds_meta
from distfinalize.sources.deepspeed.files import is_deepspeed_checkpoint, tag_files
from distfinalize.sources.deepspeed.layout import (
    Flat,
    Piece,
    pieces_of,
    zero3_fragment_layout,
    zero3_layouts,
    zero3_partitioned_numel,
    zero12_layouts,
)
from distfinalize.sources.deepspeed.meta import FALLBACK_CONSTANTS, constants, load_meta, stored_layout
from distfinalize.sources.deepspeed.source import DeepSpeedTensorReader

F32 = torch.float32


def flat(file: int, numel: int, offset: int = 1000) -> Flat:
    return Flat(file, offset, numel, F32)


def test_pieces_of_spans_flats() -> None:
    flats = [flat(0, 4), flat(1, 4)]
    assert pieces_of(flats, 1, 2) == [Piece(0, 1004, 2)]
    assert pieces_of(flats, 3, 3) == [Piece(0, 1012, 1), Piece(1, 1000, 2)]
    assert pieces_of(flats, 5, 0) == []
    with pytest.raises(ValueError, match="run past"):
        pieces_of(flats, 6, 3)


def test_zero12_uneven_partitions_and_alignment_padding() -> None:
    """Two ranks: 5 + 4 elements (saved without the trailing group padding); a 1-element pad after `a`."""
    shapes = [{"a": (3,), "b": (2, 2), "c": (1,)}]
    partitions = [[flat(0, 5)], [flat(1, 4)]]
    layouts = zero12_layouts(shapes, partitions, [[1, 0, 0]])
    assert layouts["a"].pieces == (Piece(0, 1000, 3),)
    assert layouts["b"].pieces == (Piece(0, 1016, 1), Piece(1, 1000, 3))  # elements 4..7: across the boundary
    assert layouts["c"].pieces == (Piece(1, 1012, 1),)
    assert layouts["b"].shape == (2, 2) and layouts["b"].dtype == F32


def test_zero12_groups_are_separate() -> None:
    shapes = [{"a": (4,)}, {"b": (2,)}]
    partitions = [[flat(0, 2, 0), flat(0, 1, 500)], [flat(1, 2, 0), flat(1, 1, 500)]]
    layouts = zero12_layouts(shapes, partitions, None)
    assert layouts["a"].pieces == (Piece(0, 0, 2), Piece(1, 0, 2))
    assert layouts["b"].pieces == (Piece(0, 500, 1), Piece(1, 500, 1))


def test_zero12_shapes_that_do_not_fit_are_refused() -> None:
    with pytest.raises(ValueError, match="run past"):
        zero12_layouts([{"a": (20,)}], [[flat(0, 5)], [flat(1, 5)]], None)
    with pytest.raises(ValueError, match="take 2 elements but the partitions hold 10"):
        zero12_layouts([{"a": (2,)}], [[flat(0, 5)], [flat(1, 5)]], None)


def test_zero3_padding_and_groups() -> None:
    """World 2: `a` (5 elements) takes 3 per rank, the last one padding; `b` (2) starts in the second group."""
    shapes = {"a": (5,), "b": (2, 1)}
    partitions = [[flat(0, 3, 0), flat(0, 1, 100)], [flat(1, 3, 0), flat(1, 1, 100)]]
    layouts = zero3_layouts(shapes, partitions)
    assert layouts["a"].pieces == (Piece(0, 0, 3), Piece(1, 0, 2))
    assert layouts["b"].pieces == (Piece(0, 100, 1), Piece(1, 100, 1))
    with pytest.raises(ValueError, match="take 4 elements per rank but the flat groups hold 5"):
        zero3_layouts(shapes, [[flat(0, 5)], [flat(1, 5)]])
    with pytest.raises(ValueError, match="rank 1's flat groups"):
        zero3_layouts(shapes, [[flat(0, 4)], [flat(1, 5)]])


def test_zero3_tiny_parameter_on_many_ranks() -> None:
    """3 elements over 4 ranks: one each on ranks 0-2, nothing read from rank 3."""
    layouts = zero3_layouts({"t": (3,)}, [[flat(r, 1)] for r in range(4)])
    assert layouts["t"].pieces == tuple(Piece(r, 1000, 1) for r in range(3))


def test_zero3_frozen_fragments() -> None:
    layout = zero3_fragment_layout((7,), [flat(0, 4), flat(1, 4)])
    assert layout.pieces == (Piece(0, 1000, 4), Piece(1, 1000, 3))
    with pytest.raises(ValueError, match="fragment has 2 elements"):
        zero3_fragment_layout((7,), [flat(0, 4), flat(1, 2)])


def test_matches_deepspeed_constants_and_helpers() -> None:
    """The fallback constants and the partition arithmetic are DeepSpeed's own."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed: nothing to compare with")
    from deepspeed.checkpoint import constants as ds_constants
    from deepspeed.utils.zero_to_fp32 import zero3_partitioned_param_info

    assert {k: getattr(ds_constants, k) for k in FALLBACK_CONSTANTS} == FALLBACK_CONSTANTS
    assert vars(constants()) == FALLBACK_CONSTANTS
    for numel in (1, 5, 63, 64, 4096):
        for world in (1, 2, 3, 8):
            assert zero3_partitioned_numel(numel, world) == zero3_partitioned_param_info(numel, world)[0]
            assert zero3_partitioned_numel(numel, world) == math.ceil(numel / world)


def tag_folder(path: Path, names: list[str]) -> Path:
    path.mkdir(parents=True)
    for name in names:
        (path / name).write_bytes(b"")
    return path


ZERO2 = ["mp_rank_00_model_states.pt", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"]
ZERO2 += ["bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"]
ZERO3 = [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(3)]
ZERO3 += [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(3)]


def test_tag_files_in_rank_order(tmp_path: Path) -> None:
    found = tag_files(tag_folder(tmp_path / "z3", ZERO3))
    assert [p.name for p in found.model_states] == ZERO3[:3] and [p.name for p in found.optim_states] == ZERO3[3:]
    found = tag_files(tag_folder(tmp_path / "z2", ZERO2))
    assert [p.name for p in found.model_states] == ZERO2[:1] and len(found.optim_states) == 2
    assert is_deepspeed_checkpoint(tmp_path / "z2") and not is_deepspeed_checkpoint(tag_folder(tmp_path / "x", []))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["mp_rank_01_model_states.pt"], r"tensor-parallel DeepSpeed checkpoint \(2 model-parallel ranks: found "),
        (["layer_00-model_00-model_states.pt"], r"pipeline-parallel DeepSpeed checkpoint \(1 layer files"),
        (["expp_rank_0_mp_rank_00_optim_states.pt"], r"expert-parallel \(MoE\) DeepSpeed checkpoint"),
        (["layer_0_expert_3_mp_rank_00_model_states.pt"], r"expert-parallel \(MoE\) DeepSpeed checkpoint"),
    ],
)
def test_parallel_layouts_are_refused(tmp_path: Path, extra: list[str], message: str) -> None:
    path = tag_folder(tmp_path / "global_step1", ZERO2 + extra)
    with pytest.raises(SourceError, match=message) as info:
        tag_files(path)
    assert extra[0] in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (ZERO2[:1], "no \\*_optim_states.pt files"),
        (ZERO2[1:], "no mp_rank_00_model_states.pt"),
        (
            [n for n in ZERO3 if "rank_1_" not in n],
            r"missing the model states files of rank\(s\) \[1\] \(found 2 of ranks 0-2\)",
        ),
    ],
)
def test_incomplete_tag_folders_are_refused(tmp_path: Path, names: list[str], message: str) -> None:
    with pytest.raises(SourceError, match=message):
        tag_files(tag_folder(tmp_path / "global_step1", names))


@pytest.mark.parametrize("meta_offsets", [True, False], ids=["meta-load", "fake-mode"])
def test_reader_reads_contiguous_and_strided_tensors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, meta_offsets: bool
) -> None:
    """Tensors saved as views of bigger storages: offsets come from a data-free load (map_location="meta", or
    FakeTensorMode on a torch whose meta loads do not record offsets), bytes from positioned reads."""
    monkeypatch.setattr(ds_meta, "meta_load_records_offsets", lambda: meta_offsets)
    base = torch.arange(48, dtype=torch.bfloat16).reshape(6, 8)
    saved = {"row": base[2], "t": base[1:4, 2:7].t(), "int": torch.tensor([3, -1], dtype=torch.int64)}
    path = tmp_path / "states.pt"
    torch.save(saved, path)
    meta = load_meta(path)
    assert all(not t.untyped_storage().data_ptr() for t in meta.values())  # no data was read
    layouts = {k: stored_layout(t, 0, path) for k, t in meta.items()}
    assert layouts["t"].stride is not None and layouts["row"].stride is None
    got = DeepSpeedTensorReader(tmp_path, (path,), layouts).read(list(saved))
    for key, tensor in saved.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key


def test_truncated_and_foreign_files(tmp_path: Path) -> None:
    path = tmp_path / "states.pt"
    torch.save({"w": torch.ones(4096)}, path)
    layouts = {"w": stored_layout(load_meta(path)["w"], 0, path)}
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(SourceError, match=r"cannot read tensor .w.*ends .* bytes early"):
        DeepSpeedTensorReader(tmp_path, (path,), layouts).read(["w"])
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(SourceError, match=r"not a readable torch\.save file"):
        load_meta(path)
