"""Session fixtures: real checkpoints trained by the real frameworks, once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import TRAINERS, check_ok, torchrun

FSDP2_VARIANTS = ("tied-model", "untied-model", "tied-optim", "untied-optim")


@pytest.fixture(scope="session")
def fsdp2_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FSDP2 (fully_shard) on 2 gloo ranks, 3 AdamW steps, DCP saves of all four variants."""
    out = tmp_path_factory.mktemp("fsdp2")
    args = [a for v in FSDP2_VARIANTS for a in ("--variant", v)]
    check_ok(torchrun(2, TRAINERS / "fsdp2.py", out, *args))
    return out


@pytest.fixture(scope="session")
def dtensor_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Plain dcp.save of DTensors from 3 ranks: row/column shards, all uneven."""
    out = tmp_path_factory.mktemp("dtensor")
    check_ok(torchrun(3, TRAINERS / "dtensor.py", out))
    return out / "dtensor"


@pytest.fixture(scope="session")
def accelerate_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Accelerate (FSDP2 plugin, SHARDED_STATE_DICT) on 2 gloo ranks; save_state writes pytorch_model_fsdp_0/."""
    out = tmp_path_factory.mktemp("accelerate")
    check_ok(torchrun(2, TRAINERS / "accelerate_fsdp.py", out, "--variant", "tied", "--variant", "untied"))
    return out


@pytest.fixture(scope="session")
def lora_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """peft LoRA under FSDP2 on 2 gloo ranks, 3 AdamW steps: a full PeftModel state dict (frozen base inside) and
    an adapter-only one (with the base model saved beside it)."""
    out = tmp_path_factory.mktemp("lora")
    check_ok(torchrun(2, TRAINERS / "fsdp2_lora.py", out))
    return out


@pytest.fixture(scope="session")
def trl_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TRL SFTTrainer + peft LoRA under Accelerate FSDP2 (SHARDED_STATE_DICT) on 2 gloo ranks, 3 steps: OUT/run/
    checkpoint-3 (adapter-only DCP, no config.json) and OUT/base-model/; a FinalizeCallback finalized the
    checkpoint into OUT/callback/model when training ended."""
    out = tmp_path_factory.mktemp("trl")
    check_ok(torchrun(2, TRAINERS / "trl_sft_lora.py", out, "--finalize", out / "callback" / "model"))
    return out
