"""The streaming safetensors writer produces exactly the library's own bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from distfinalize.write import SAFETENSORS_DTYPES, SafetensorsWriter, layout


def sample_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = {}
    for i, dtype in enumerate(SAFETENSORS_DTYPES):
        base = torch.randn(3, 5 + i, generator=gen) * 10
        out[f"t{i}.{str(dtype).removeprefix('torch.')}"] = base > 0 if dtype == torch.bool else base.to(dtype)
    out["empty"] = torch.zeros(0, 4)
    out["scalar"] = torch.tensor(3.5, dtype=torch.float16)
    return out


def write(path: Path, tensors: dict[str, torch.Tensor], order: list[str]) -> None:
    writer = SafetensorsWriter(path, layout([(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]))
    for name in order:
        writer.write(name, tensors[name])
    writer.close()


def test_bytes_identical_to_save_file(tmp_path: Path) -> None:
    tensors = sample_tensors()
    write(tmp_path / "ours.safetensors", tensors, list(reversed(tensors)))
    save_file(tensors, tmp_path / "lib.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "lib.safetensors").read_bytes()
    loaded = load_file(tmp_path / "ours.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


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
