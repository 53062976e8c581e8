"""Session fixtures: real checkpoints trained by the real frameworks, once per test session."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from support import TIMEOUT_S, TRAINERS, check_ok, env, torchrun

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
def hf_trainer_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The transformers Trainer on CPU (one process), 4 steps, tied and untied: its checkpoint-N dirs, and the
    sharded safetensors / .bin model dirs made from the trained models (examples/trainers/hf_trainer.py)."""
    out = tmp_path_factory.mktemp("hf_trainer")
    cmd = [sys.executable, str(TRAINERS / "hf_trainer.py"), str(out)]
    check_ok(subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=TIMEOUT_S, check=False))
    return out


@pytest.fixture(scope="session")
def verl_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """verl's FSDP checkpoint layout (examples/trainers/verl_fsdp.py) on 2 gloo ranks: FSDP2, FSDP2 tied, FSDP1,
    hybrid FSDP2 (ddp x fsdp mesh) and FSDP2 LoRA actors, each OUT/verl-<variant>/global_step_3/actor/ with
    references in OUT/verl-<variant>-ref/."""
    out = tmp_path_factory.mktemp("verl")
    variants = ("fsdp2", "fsdp2-tied", "fsdp1", "hsdp2", "lora")
    check_ok(torchrun(2, TRAINERS / "verl_fsdp.py", out, *(a for v in variants for a in ("--variant", v))))
    return out


@pytest.fixture(scope="session")
def hf_storage_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FSDP2 on 2 gloo ranks saved by dcp.save with torch's HuggingFaceStorageWriter: per-rank shards, and the
    consolidated variant (shards under sharded/ + whole tensors + index)."""
    out = tmp_path_factory.mktemp("hf_storage")
    check_ok(torchrun(2, TRAINERS / "fsdp2_hf_storage.py", out))
    return out


@pytest.fixture(scope="session")
def trl_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TRL SFTTrainer + peft LoRA under Accelerate FSDP2 (SHARDED_STATE_DICT) on 2 gloo ranks, 3 steps: OUT/run/
    checkpoint-3 (adapter-only DCP, no config.json) and OUT/base-model/; a FinalizeCallback finalized the
    checkpoint into OUT/callback/model when training ended."""
    out = tmp_path_factory.mktemp("trl")
    check_ok(torchrun(2, TRAINERS / "trl_sft_lora.py", out, "--finalize", out / "callback" / "model"))
    return out


@pytest.fixture(scope="session")
def accelerate_fsdp1_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Accelerate FSDP1 on 2 gloo ranks (examples/trainers/accelerate_fsdp1.py): SHARDED_STATE_DICT saved
    without DCP (pytorch_model_fsdp_0_rank<R>.bin) and LOCAL_STATE_DICT (pytorch_model_fsdp_rank<R>.bin)."""
    out = tmp_path_factory.mktemp("accelerate-fsdp1")
    check_ok(torchrun(2, TRAINERS / "accelerate_fsdp1.py", out, "--variant", "sharded", "--variant", "local"))
    return out
