"""The streaming safetensors writer produces exactly the library's own bytes."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from distfinalize.hfnames import SAFETENSORS_DTYPES
from distfinalize.write import writer as writer_module
from distfinalize.write.writer import DIRECT_ALIGNMENT, SafetensorsWriter, StageBuffer, layout


def sample_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = {}
    for i, dtype in enumerate(SAFETENSORS_DTYPES):
        base = torch.randn(3, 5 + i, generator=gen) * 10
        out[f"t{i}.{str(dtype).removeprefix('torch.')}"] = base > 0 if dtype == torch.bool else base.to(dtype)
    out["empty"] = torch.zeros(0, 4)
    out["scalar"] = torch.tensor(3.5, dtype=torch.float16)
    return out


def write(
    path: Path, tensors: dict[str, torch.Tensor], stage: StageBuffer | None = None, order: str = "file"
) -> tuple[SafetensorsWriter, str]:
    """Write `tensors` in file order, or `order="mixed"`: the second half of the file first; returns the closed
    writer and the sha256 it returned."""
    plan = layout([(n, tuple(t.shape), t.dtype) for n, t in tensors.items()])
    writer = SafetensorsWriter(path, plan, stage)
    names = [slot.name for slot in sorted(plan.slots.values(), key=lambda s: (s.start, s.name))]
    if order == "mixed":
        names = names[len(names) // 2 :] + names[: len(names) // 2]
    for name in names:
        writer.write(name, tensors[name])
    return writer, writer.close()


@pytest.mark.parametrize("order", ["file", "mixed", "mixed, over the hold"])
@pytest.mark.parametrize("stage_bytes", [None, DIRECT_ALIGNMENT, 3 * DIRECT_ALIGNMENT, 2**20])
def test_bytes_identical_to_save_file(
    tmp_path: Path, stage_bytes: int | None, order: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the page cache, and staged in blocks smaller and larger than the file (O_DIRECT where /tmp's file
    system takes it: ext4 here), in file order or not, the file is the library's, and the returned sha256 is the
    file's. Tensors that come early are held until their turn (the file stays in order) unless they exceed the
    hold."""
    tensors = sample_tensors()
    tensors["big"] = torch.randn(3000, 7, generator=torch.Generator().manual_seed(1))  # spans several blocks
    stage = StageBuffer(stage_bytes) if stage_bytes else None
    if order.endswith("hold"):
        monkeypatch.setattr(writer_module, "HOLD_BYTES", 16)
    writer, digest = write(tmp_path / "ours.safetensors", tensors, stage, order.partition(",")[0])
    assert writer.in_order == (order != "mixed, over the hold")
    assert not writer.held
    save_file(tensors, tmp_path / "lib.safetensors", metadata={"format": "pt"})
    ours = (tmp_path / "ours.safetensors").read_bytes()
    assert ours == (tmp_path / "lib.safetensors").read_bytes()
    assert digest == hashlib.sha256(ours).hexdigest()
    loaded = load_file(tmp_path / "ours.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_a_stage_buffer_is_reused_across_files(tmp_path: Path) -> None:
    stage = StageBuffer(DIRECT_ALIGNMENT)
    first = {"a": torch.arange(5000, dtype=torch.int32)}
    second = {"b": torch.ones(3, dtype=torch.float16)}  # shorter than what the buffer last held
    write(tmp_path / "1.safetensors", first, stage)
    write(tmp_path / "2.safetensors", second, stage)
    assert torch.equal(load_file(tmp_path / "1.safetensors")["a"], first["a"])
    assert (tmp_path / "2.safetensors").read_bytes() == save_file_bytes(second, tmp_path / "lib.safetensors")


def test_a_refused_direct_write_falls_back_to_the_page_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Some file systems take O_DIRECT at open but refuse the write with EINVAL: the writer carries on without it.
    The refusal is injected (os.pwrite raising EINVAL for the first staged block); the bytes are checked whole."""
    import distfinalize.write.writer as write_module

    real, refused = os.pwrite, []

    def refuse_first_block(fd: int, data: memoryview, offset: int) -> int:
        if not refused and len(data) % DIRECT_ALIGNMENT == 0:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(write_module.os, "pwrite", refuse_first_block)
    tensors = {"x": torch.randn(4000, generator=torch.Generator().manual_seed(2))}
    writer, _ = write(tmp_path / "ours.safetensors", tensors, StageBuffer(DIRECT_ALIGNMENT))
    assert refused == [0] and not writer.direct
    assert (tmp_path / "ours.safetensors").read_bytes() == save_file_bytes(tensors, tmp_path / "lib.safetensors")


def save_file_bytes(tensors: dict[str, torch.Tensor], path: Path) -> bytes:
    save_file(tensors, path, metadata={"format": "pt"})
    return path.read_bytes()


def test_dtype_table_matches_safetensors(tmp_path: Path) -> None:
    """Every code in our table is the one the library writes for that dtype."""
    import json
    import struct

    for dtype, code in SAFETENSORS_DTYPES.items():
        path = tmp_path / "x.safetensors"
        save_file({"x": torch.zeros(2, dtype=dtype)}, path)
        raw = path.read_bytes()
        header = json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])
        assert header["x"]["dtype"] == code


def test_wrong_tensor_and_missing_tensor_are_caught(tmp_path: Path) -> None:
    plan = layout([("a", (2, 2), torch.float32), ("b", (3,), torch.bfloat16)])
    writer = SafetensorsWriter(tmp_path / "x.safetensors", plan)
    with pytest.raises(ValueError, match="planned"):
        writer.write("a", torch.zeros(2, 2, dtype=torch.float16))
    writer.write("a", torch.zeros(2, 2))
    with pytest.raises(RuntimeError, match=r"never written, e\.g\. b"):
        writer.close()


def test_unsupported_dtype_is_refused() -> None:
    with pytest.raises(ValueError, match="safetensors cannot store"):
        layout([("c", (2,), torch.complex64)])


@pytest.mark.parametrize("stage_bytes", [None, DIRECT_ALIGNMENT])
def test_row_blocks_in_any_order_make_the_same_file(tmp_path: Path, stage_bytes: int | None) -> None:
    """Tensors written in blocks of rows, a later tensor's blocks between an earlier one's (a weight's scales
    arrive with each block of its data): the library's bytes, in order, nothing held at the end."""
    tensors = {"a": torch.randn(50, 6, dtype=torch.float64), "b": torch.randn(40, 3), "c": torch.randn(5)}
    plan = layout([(n, tuple(t.shape), t.dtype) for n, t in tensors.items()])
    writer = SafetensorsWriter(tmp_path / "ours.safetensors", plan, StageBuffer(stage_bytes) if stage_bytes else None)
    writer.write("c", tensors["c"])  # after both in the file: held
    for lo in range(0, 50, 20):
        writer.write("a", tensors["a"][lo : lo + 20], row=lo)
        writer.write("b", tensors["b"][lo // 2 : lo // 2 + 10], row=lo // 2)  # b's first 30 rows: held
    writer.write("b", tensors["b"][30:], row=30)
    digest = writer.close()
    assert writer.in_order and not writer.held
    assert (tmp_path / "ours.safetensors").read_bytes() == save_file_bytes(tensors, tmp_path / "lib.safetensors")
    assert digest == hashlib.sha256((tmp_path / "ours.safetensors").read_bytes()).hexdigest()


def test_a_missing_block_is_caught(tmp_path: Path) -> None:
    plan = layout([("a", (4, 2), torch.float32)])
    writer = SafetensorsWriter(tmp_path / "x.safetensors", plan)
    writer.write("a", torch.zeros(2, 2), row=0)
    with pytest.raises(RuntimeError, match="never written"):
        writer.close()
    with pytest.raises(ValueError, match="at row 3"):
        SafetensorsWriter(tmp_path / "y.safetensors", plan).write("a", torch.zeros(2, 2), row=3)


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("truncate", [True, False])
def test_a_symlink_in_the_output_place_is_refused(tmp_path: Path, direct: bool, truncate: bool) -> None:
    """A file reopened in a staging dir (a resumed run) is never written through a link planted in its place."""
    target = tmp_path / "elsewhere"
    target.write_bytes(b"keep")
    link = tmp_path / "model-00001-of-00002.safetensors"
    link.symlink_to(target)
    with pytest.raises(OSError) as caught:
        writer_module.open_output(link, direct, truncate)
    assert caught.value.errno == errno.ELOOP
    assert target.read_bytes() == b"keep"
