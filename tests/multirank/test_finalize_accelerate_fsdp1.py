"""Finalize Accelerate FSDP1 per-rank model files with 1 and 2 ranks.

The checkpoints come from examples/trainers/accelerate_fsdp1.py: real Accelerate FSDP1 on 2 CPU/gloo ranks.
SHARDED_STATE_DICT saved without DCP (`save_fsdp_model(..., use_dcp=False)`, ShardedTensors per rank) finalizes
bit-identical to the trained weights; LOCAL_STATE_DICT (flat-parameter shards) is refused in one line naming the
setting to use. Marked `dist`.
"""

from __future__ import annotations

from pathlib import Path

import common
import pytest
import torch
from support import check_ok, error_lines, finalize, our_traceback, read_output, tree_digest
from transformers import AutoModelForCausalLM

from distfinalize.sources import rankfiles
from distfinalize.sources.accelerate_ranks import open_accelerate_ranks

pytestmark = pytest.mark.dist

CKPT = Path("checkpoints") / "checkpoint-3"


@pytest.mark.parametrize("nproc", [1, 2])
def test_sharded_without_dcp_is_bit_identical(accelerate_fsdp1_runs: Path, tmp_path: Path, nproc: int) -> None:
    """SRC is the run dir (latest checkpoint-N); every tensor is the trained one; transformers loads DEST with the
    trained model's logits."""
    run, dest = accelerate_fsdp1_runs / "accelerate1-sharded", tmp_path / "out"
    result = check_ok(finalize(run, dest, nproc=nproc))
    assert f"accelerate-fsdp-ranks checkpoint {run / CKPT}" in result.stderr
    reference = torch.load(run / "reference.pt")
    tensors, _ = read_output(dest)
    assert set(tensors) == set(reference)
    for name, tensor in tensors.items():
        assert torch.equal(tensor, reference[name]), name
    model = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=common.reference_input()).logits
    assert torch.equal(logits, torch.load(run / "reference_logits.pt"))


def test_layout_comes_from_rank0s_file(accelerate_fsdp1_runs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ShardedTensor metadata in rank 0's file lists every rank's shard: opening the checkpoint parses rank 0's
    file alone; reading a tensor parses the files holding its shards, once each."""
    opened: list[str] = []
    original = rankfiles.load_rank_file

    def recording(path: Path, hint: str) -> dict:
        opened.append(path.name)
        return original(path, hint)

    monkeypatch.setattr(rankfiles, "load_rank_file", recording)
    source = open_accelerate_ranks(accelerate_fsdp1_runs / "accelerate1-sharded" / CKPT, 3)
    assert opened == ["pytorch_model_fsdp_0_rank0.bin"]
    assert source.info.saved_world_size == 2
    assert all(s.listed is not None and s.world == 2 for s in source.stored.values())
    reader = source.reader()
    keys = [t.key for t in source.tensors]
    reader.read(keys[:2])
    reader.read(keys[2:4])
    assert sorted(opened[1:]) == ["pytorch_model_fsdp_0_rank0.bin", "pytorch_model_fsdp_0_rank1.bin"]


@pytest.mark.parametrize("nproc", [1, 2])
def test_local_state_dict_is_refused(accelerate_fsdp1_runs: Path, tmp_path: Path, nproc: int) -> None:
    run, dest = accelerate_fsdp1_runs / "accelerate1-local", tmp_path / "out"
    before = tree_digest(run)
    result = finalize(run, dest, nproc=nproc)
    assert result.returncode == 1
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "LOCAL_STATE_DICT" in lines[0], result.stderr
    assert "fsdp_state_dict_type: SHARDED_STATE_DICT" in lines[0]
    assert not our_traceback(result.stderr) and not dest.exists() and tree_digest(run) == before
