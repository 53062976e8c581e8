"""Files with quantized weights are laid out so their tensors arrive in file order: written past the page cache
and hashed as they are written, never read back."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from distfinalize.plan import FilePlan, TensorPlan
from distfinalize.transform.cast import to_output
from distfinalize.write.rank import file_layout, write_order
from distfinalize.write.writer import SafetensorsWriter, StageBuffer, aligned

pytest.importorskip("torchao", reason="the recipes' math is torchao's")
pytest.importorskip("compressed_tensors", reason="the int recipes pack with compressed-tensors")


def quantized_file(recipe: str) -> FilePlan:
    bf16 = torch.bfloat16
    tensors = (
        TensorPlan("model.embed_tokens.weight", "e", (64, 128), bf16, bf16),
        TensorPlan("model.layers.0.mlp.up_proj.weight", "u", (256, 128), bf16, bf16, quant=recipe),
        TensorPlan("model.layers.0.input_layernorm.weight", "n", (128,), torch.float32, bf16),
        TensorPlan("model.layers.0.mlp.down_proj.weight", "d", (128, 256), bf16, bf16, quant=recipe),
    )
    return FilePlan("model.safetensors", 0, tensors)


@pytest.mark.parametrize("recipe", ["fp8", "fp8-block", "int8", "int4"])
def test_a_quantized_file_is_written_in_order_and_loads(tmp_path: Path, recipe: str) -> None:
    file = quantized_file(recipe)
    plan = file_layout(file)
    assert aligned(plan)
    gen = torch.Generator().manual_seed(0)
    sources = {t.name: torch.randn(t.shape, generator=gen).to(t.source_dtype) for t in file.tensors}
    writer = SafetensorsWriter(tmp_path / file.filename, plan, StageBuffer(1 << 16))
    expected = {}
    for t in write_order(file):
        outputs = to_output(sources[t.name], t, torch.device("cpu"))
        expected.update(outputs)
        for name, tensor in sorted(outputs.items(), key=lambda o: plan.slots[o[0]].start):
            writer.write(name, tensor)
    digest = writer.close()
    assert writer.in_order  # every tensor came at its offset in turn: hashed as written, no read-back
    assert digest == hashlib.sha256((tmp_path / file.filename).read_bytes()).hexdigest()
    with safe_open(str(tmp_path / file.filename), framework="pt") as f:
        assert sorted(f.keys()) == sorted(expected)
        for name, tensor in expected.items():
            got = f.get_tensor(name)
            assert got.dtype == tensor.dtype and torch.equal(got.view(torch.uint8), tensor.view(torch.uint8)), name


def test_a_quantized_weight_keeps_its_outputs_together() -> None:
    """fp8: each weight's e4m3 data, then its scale, in the plan's order; unquantized files keep the library's."""
    slots = sorted(file_layout(quantized_file("fp8")).slots.values(), key=lambda s: s.start)
    assert [s.name for s in slots] == [
        "model.embed_tokens.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.mlp.up_proj.weight_scale",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.mlp.down_proj.weight_scale",
    ]
    plain = FilePlan("a", 0, tuple(t for t in quantized_file("fp8").tensors if t.quant is None))
    names = [s.name for s in sorted(file_layout(plain).slots.values(), key=lambda s: s.start)]
    assert names == ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight"]  # by dtype, then name


def test_a_layout_that_would_misalign_falls_back_to_the_library_order() -> None:
    """int8 with 3 output rows: packed [3, 32] + scale [3, 1] is 396 bytes, so weight_shape (int64) would sit at an
    offset that is not a multiple of 8 right after them."""
    t = TensorPlan("m.weight", "m", (3, 128), torch.bfloat16, torch.bfloat16, quant="int8")
    plan = file_layout(FilePlan("x", 0, (t,)))
    assert aligned(plan)
    assert min(plan.slots.values(), key=lambda s: s.start).name == "m.weight_shape"  # I64 first


def test_ranks_balance_the_quantizers_work_not_only_the_bytes_written() -> None:
    """An fp8 weight writes half its source bytes but its rank reads and quantizes all of them: the plan's pieces
    weigh a quantized weight's output plus its source, so the two ranks share the quantizing."""
    from distfinalize.pieces import Segment, split_pieces
    from distfinalize.plan import build_plan, file_layout, file_segments, piece_parts
    from distfinalize.sources import TensorMeta

    bf16 = torch.bfloat16
    metas = [TensorMeta("e", "model.embed_tokens.weight", (4096, 256), bf16)]
    metas += [TensorMeta(f"u{i}", f"model.layers.{i}.mlp.up_proj.weight", (2048, 256), bf16) for i in range(4)]
    quant = {m.name: "fp8" for m in metas[1:]}
    plan = build_plan(metas, dtype=bf16, max_shard_size=1_100_000, world_size=2, quant=quant)
    assert [len(f.tensors) for f in plan.files] == [1, 2, 2]  # the embedding (2 MiB), then 2 x 1 MiB of fp8

    def work(pieces_of) -> list[int]:
        """Each rank's work (TensorPlan.work) under a cut of the files into pieces."""
        out = [0, 0]
        for f, pieces in zip(plan.files, pieces_of, strict=True):
            for p in pieces:
                for t, rows in piece_parts(f, p, file_layout(f, plan.metadata)):
                    out[p.rank] += t.work if rows is None else t.work * (rows[1] - rows[0]) // t.shape[0]
        return out

    planned = work([f.ranges for f in plan.files])
    assert max(planned) - min(planned) <= max(t.work for t in plan.tensors)  # within one weight of even
    segments = [file_segments(f, plan.metadata, True) for f in plan.files]
    unweighted = [[Segment(s.start, s.stop, s.row_bytes) for s in segs] for segs in segments]
    by_bytes = split_pieces([(f.nbytes, segs) for f, segs in zip(plan.files, unweighted, strict=True)], 2)
    assert max(work(by_bytes)) > max(planned) * 1.25  # by bytes alone, rank 1 would quantize every weight
    unquantized = build_plan(metas, dtype=bf16, max_shard_size=1_100_000, world_size=2)
    assert all(t.work == t.nbytes for t in unquantized.tensors)
