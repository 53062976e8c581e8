"""Property tests (hypothesis): random layouts finalize bit-exactly; random corruption is always an error
or provably harmless, never a hang and never silently wrong output."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from support import REPO, check_ok, torchrun

from distfinalize.config import FinalizeConfig
from distfinalize.dist.context import DistContext
from distfinalize.errors import SourceError
from distfinalize.pipeline import run

pytestmark = pytest.mark.dist


def test_random_dtensor_layouts(tmp_path: Path) -> None:
    """3 ranks: random shapes, dtypes, row/column/uneven/replicated DTensors, nested or flat; see the script."""
    result = check_ok(torchrun(3, REPO / "tests" / "property_layouts.py", tmp_path, "--examples", "25"))
    assert "Falsifying" not in result.stdout + result.stderr


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A single-process DCP save of a few tensors, and the tensors."""
    out = tmp_path_factory.mktemp("corrupt") / "ckpt"
    gen = torch.Generator().manual_seed(0)
    tensors = {f"layer{i}.weight": torch.randn(16, 8 + i, generator=gen) for i in range(6)}
    tensors["layer0.bias"] = torch.arange(16, dtype=torch.int64)
    dcp.save({k: v.clone() for k, v in tensors.items()}, checkpoint_id=str(out), no_dist=True)
    return out, tensors


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_corruption_is_never_silent(saved, tmp_path_factory: pytest.TempPathFactory, data) -> None:
    src, tensors = saved
    case = tmp_path_factory.mktemp("case")
    broken = case / "ckpt"
    shutil.copytree(src, broken)
    # The data files. DCP's .metadata is a pickle with no checksum: damage to it is caught when it breaks
    # its structure (tests/trust/test_bad_input.py), names (checked against config.json) or chunk
    # dtypes/shapes, but two swapped same-shaped offsets would go unseen, so it is not fuzzed here.
    files = sorted(broken.glob("*.distcp"))
    path = data.draw(st.sampled_from(files), label="file")
    raw = bytearray(path.read_bytes())
    action = data.draw(st.sampled_from(["flip", "truncate", "zero-run"]), label="action")
    at = data.draw(st.integers(0, max(len(raw) - 1, 0)), label="offset")
    if action == "flip":
        raw[at] ^= data.draw(st.integers(1, 255), label="mask")
    elif action == "truncate":
        del raw[at:]
    else:
        raw[at : at + 64] = bytes(len(raw[at : at + 64]))
    path.write_bytes(bytes(raw))
    dest = case / "out"
    try:
        run(FinalizeConfig(src=broken, dest=dest, log_level="error", tensors_only=True), DistContext())
    except SourceError:
        assert not dest.exists()
        return
    written = load_file(dest / "model.safetensors")  # it worked: then every byte must be right
    assert written.keys() == tensors.keys()
    assert all(torch.equal(written[k], v) for k, v in tensors.items())
