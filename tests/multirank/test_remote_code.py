"""transformers loads the model code distfinalize copies: a real trust_remote_code load, in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from unit.test_artifacts_code import remote_code_source

from distfinalize.artifacts.code import copy_model_code, model_code_files

pytestmark = pytest.mark.dist


def test_transformers_loads_the_copied_remote_code(tmp_path: Path) -> None:
    """The chosen files are enough: AutoConfig + AutoModelForCausalLM load them with trust_remote_code."""
    root = remote_code_source(tmp_path / "src")
    out = tmp_path / "dest"
    out.mkdir()
    (out / "config.json").write_text((root / "config.json").read_text())
    copy_model_code(model_code_files(root), out)
    script = (
        "import sys\n"
        "from transformers import AutoConfig, AutoModelForCausalLM\n"
        "config = AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "model = AutoModelForCausalLM.from_config(config, trust_remote_code=True)\n"
        "print(type(config).__name__, type(model).__name__, model.rope_scale)\n"
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script, str(out)], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["TinyConfig", "TinyForCausalLM", "2.0"]
