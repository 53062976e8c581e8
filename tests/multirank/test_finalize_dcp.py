"""Finalize real DCP checkpoints (FSDP2, plain DTensor saves) with 1, 2 and 3 ranks, and check every byte.

Marked `dist`: these run real torchrun jobs on CPU/gloo.
"""

from __future__ import annotations

from pathlib import Path

import common
import pytest
import torch
from support import check_ok, finalize, read_json, read_output
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.dist

SHARD = "60KB"  # the tiny model is ~400 KB in float32: several files, more than one per rank


def reference_logits(run: Path, dtype: torch.dtype) -> torch.Tensor:
    """Logits of the trained model, with its weights cast to `dtype` (the model as saved, for float32)."""
    if dtype == torch.float32:
        return torch.load(run / "reference_logits.pt")
    tie = read_json(run / "config.json")["tie_word_embeddings"]
    model = AutoModelForCausalLM.from_config(common.tiny_config(tie), dtype=dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in torch.load(run / "reference.pt").items()}, strict=False)
    model.eval()
    with torch.no_grad():
        return model(input_ids=common.reference_input()).logits


def check_finalized(run: Path, dest: Path, dtype: torch.dtype) -> None:
    """Bit-identical tensors, an exact index, config.json updated, equal logits from transformers."""
    reference = torch.load(run / "reference.pt")
    tied = read_json(run / "config.json")["tie_word_embeddings"]
    tensors, where = read_output(dest)

    expected = set(reference) - ({"lm_head.weight"} if tied else set())
    assert set(tensors) == expected
    for name, tensor in tensors.items():
        want = reference[name].to(dtype)
        assert tensor.dtype == want.dtype and torch.equal(tensor, want), name

    files = sorted(p.name for p in dest.glob("*.safetensors"))
    assert len(files) > 1
    index = read_json(dest / "model.safetensors.index.json")
    assert index["weight_map"] == where
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert sorted(set(index["weight_map"].values())) == files
    assert files == [f"model-{k:05d}-of-{len(files):05d}.safetensors" for k in range(1, len(files) + 1)]

    config = read_json(dest / "config.json")
    assert config["dtype"] == str(dtype).removeprefix("torch.")
    assert config["tie_word_embeddings"] == tied
    assert config["architectures"] == ["LlamaForCausalLM"]
    extras = [
        "README.md",
        "config.json",
        "distfinalize-manifest.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert sorted(p.name for p in dest.iterdir()) == sorted([*files, *extras, "model.safetensors.index.json"])

    model = AutoModelForCausalLM.from_pretrained(dest, dtype=dtype).eval()
    with torch.no_grad():
        logits = model(input_ids=common.reference_input()).logits
    assert torch.equal(logits, reference_logits(run, dtype))


@pytest.mark.parametrize("nproc", [1, 2, 3])
@pytest.mark.parametrize("variant", ["tied-model", "untied-model", "tied-optim", "untied-optim"])
def test_fsdp2_checkpoint(fsdp2_runs: Path, tmp_path: Path, variant: str, nproc: int) -> None:
    """FSDP2 saved by 2 ranks, finalized by 1, 2 or 3; SRC is the training output dir (latest checkpoint found)."""
    run = fsdp2_runs / variant
    dest = tmp_path / "out"
    result = check_ok(finalize(run, dest, "--max-shard-size", SHARD, nproc=nproc))
    assert "checkpoint-3" in result.stderr
    check_finalized(run, dest, torch.float32)


@pytest.mark.parametrize("nproc", [1, 2])
def test_cast_to_bfloat16(fsdp2_runs: Path, tmp_path: Path, nproc: int) -> None:
    """--dtype bfloat16: every tensor is the trained float32 tensor cast once; config.json says bfloat16."""
    run = fsdp2_runs / "untied-optim"
    dest = tmp_path / "out"
    check_ok(finalize(run, dest, "--max-shard-size", "30KB", "--dtype", "bfloat16", nproc=nproc))
    check_finalized(run, dest, torch.bfloat16)


@pytest.mark.parametrize("nproc", [2, 3])
def test_dtensor_uneven_shards(dtensor_run: Path, tmp_path: Path, nproc: int) -> None:
    """Row/column DTensor shards saved by 3 ranks with uneven splits, plus a non-tensor entry to skip."""
    dest = tmp_path / "out"
    check_ok(finalize(dtensor_run, dest, "--max-shard-size", SHARD, nproc=nproc))
    check_finalized(dtensor_run, dest, torch.float32)


def test_single_file_has_no_index(fsdp2_runs: Path, tmp_path: Path) -> None:
    """Everything under --max-shard-size goes to model.safetensors with no index, like save_pretrained."""
    run = fsdp2_runs / "untied-model"
    dest = tmp_path / "out"
    check_ok(finalize(run, dest))
    assert {"config.json", "model.safetensors"} <= {p.name for p in dest.iterdir()}
    assert not list(dest.glob("model-*")) and not (dest / "model.safetensors.index.json").exists()
    tensors, _ = read_output(dest)
    reference = torch.load(run / "reference.pt")
    assert set(tensors) == set(reference)
    assert all(torch.equal(tensors[k], reference[k]) for k in tensors)


@pytest.mark.parametrize("nproc", [1, 3])
@pytest.mark.parametrize("variant", ["accelerate-tied", "accelerate-untied"])
def test_accelerate_sharded_state_dict(accelerate_runs: Path, tmp_path: Path, variant: str, nproc: int) -> None:
    """Accelerate's save_state layout: SRC is the save dir, the model in pytorch_model_fsdp_0/ beside optimizer_0/."""
    run = accelerate_runs / variant
    assert (run / "checkpoints" / "checkpoint-3" / "pytorch_model_fsdp_0" / ".metadata").is_file()
    dest = tmp_path / "out"
    result = check_ok(finalize(run / "checkpoints" / "checkpoint-3", dest, "--max-shard-size", SHARD, nproc=nproc))
    assert "pytorch_model_fsdp_0" in result.stderr
    check_finalized(run, dest, torch.float32)
