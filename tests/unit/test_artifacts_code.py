"""Model code: the top-level modules auto_map names, plus their relative imports, are copied (tests/multirank/
test_remote_code.py loads the copy with transformers)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from distfinalize.artifacts.code import copy_model_code, model_code_files
from distfinalize.errors import DestinationError, SourceError

CONFIGURATION = """
from transformers import LlamaConfig


class TinyConfig(LlamaConfig):
    model_type = "tiny-remote"
"""
MODELING = """
from transformers import LlamaForCausalLM

from .configuration_tiny import TinyConfig
from .rope import SCALE


class TinyForCausalLM(LlamaForCausalLM):
    config_class = TinyConfig
    rope_scale = SCALE
"""
ROPE = "SCALE = 2.0\n"


def remote_code_source(root: Path) -> Path:
    """A source root laid out like a remote-code model beside a training run."""
    root.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": "tiny-remote",
        "architectures": ["TinyForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_tiny.TinyConfig",
            "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM",
            "AutoModel": "someone/other-repo--modeling_other.OtherModel",  # code in another repo: no local file
        },
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "num_hidden_layers": 1,
        "vocab_size": 64,
    }
    (root / "config.json").write_text(json.dumps(config))
    (root / "tokenizer_config.json").write_text(
        json.dumps({"auto_map": {"AutoTokenizer": ["tokenization_tiny.TinyTokenizer", None]}})
    )
    (root / "configuration_tiny.py").write_text(CONFIGURATION)
    (root / "modeling_tiny.py").write_text(MODELING)
    (root / "rope.py").write_text(ROPE)
    (root / "tokenization_tiny.py").write_text("class TinyTokenizer:\n    pass\n")
    (root / "train.py").write_text("print('training script, not model code')\n")
    (root / "pkg").mkdir()
    (root / "pkg" / "helper.py").write_text("X = 1\n")
    return root


def test_auto_map_modules_and_their_relative_imports(tmp_path: Path) -> None:
    root = remote_code_source(tmp_path / "src")
    files = model_code_files(root)
    assert [p.name for p in files] == ["configuration_tiny.py", "modeling_tiny.py", "rope.py", "tokenization_tiny.py"]
    assert all(p.parent == root for p in files)


def test_without_auto_map_nothing_is_copied(tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (root / "train.py").write_text("pass\n")
    (root / "modeling_llama.py").write_text("pass\n")
    assert model_code_files(root) == []
    assert model_code_files(tmp_path / "no-config-here") == []


def test_missing_module_is_a_warning_not_a_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "src"
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "modeling_gone.GoneModel"}}))
    logger = logging.getLogger("distfinalize.artifacts.code")
    logger.addHandler(caplog.handler)  # the package logger may not propagate once setup_logging ran
    try:
        assert model_code_files(root) == []
    finally:
        logger.removeHandler(caplog.handler)
    assert "modeling_gone" in caplog.text


def test_bad_auto_map_is_a_source_error(tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"auto_map": ["not", "a", "mapping"]}))
    with pytest.raises(SourceError, match="auto_map"):
        model_code_files(root)


def test_copy_keeps_content_and_times(tmp_path: Path) -> None:
    root = remote_code_source(tmp_path / "src")
    os.utime(root / "rope.py", (1_000_000_000, 1_000_000_000))
    out = tmp_path / "dest"
    out.mkdir()
    copied = copy_model_code(model_code_files(root), out)
    assert copied == [out / n for n in ("configuration_tiny.py", "modeling_tiny.py", "rope.py", "tokenization_tiny.py")]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in copied)
    assert all(p.read_bytes() == (root / p.name).read_bytes() for p in copied)
    assert (out / "rope.py").stat().st_mtime == 1_000_000_000


def test_copy_into_missing_dir_is_a_destination_error(tmp_path: Path) -> None:
    root = remote_code_source(tmp_path / "src")
    with pytest.raises(DestinationError, match="cannot copy model code"):
        copy_model_code(model_code_files(root), tmp_path / "missing")
