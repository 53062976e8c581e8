"""A JSON file we parse that exists but does not parse (or is not an object) is an error naming the file and the
JSON error's line and column, never taken for an absent file. Real CLI runs on a trained FSDP2 run, plus the
adapter_config.json and the lookup itself called directly."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from support import error_lines, finalize, our_traceback, tree_digest

from distfinalize.config import FinalizeConfig, LoraOptions
from distfinalize.errors import SourceError
from distfinalize.prepare.peft import load_lora_config
from distfinalize.sources.locate import find_model_config

CKPT = Path("checkpoints") / "checkpoint-3"


@pytest.fixture
def run(fsdp2_runs: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(fsdp2_runs / "untied-model", out)
    return out


def truncate(path: Path) -> tuple[int, int]:
    """Cut a JSON file after its third line: (line, column) where json.loads then fails."""
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:3]))
    try:
        json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        return exc.lineno, exc.colno
    raise AssertionError(f"{path} still parses")


def assert_one_error(result: subprocess.CompletedProcess, dest: Path, *words: str) -> str:
    assert result.returncode == 1, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert not our_traceback(result.stderr), result.stderr
    assert "no config.json found" not in result.stderr
    assert not dest.exists() and not dest.with_name(dest.name + ".distfinalize-staging").exists()
    return lines[0]


@pytest.mark.dist
def test_truncated_config_json_is_an_error(run: Path, tmp_path: Path) -> None:
    line, column = truncate(run / "config.json")
    before = tree_digest(run)
    dest = tmp_path / "out"
    result = finalize(run, dest)
    assert_one_error(
        result, dest, "config.json is not valid JSON", str(run / "config.json"), f"line {line} column {column}"
    )
    assert tree_digest(run) == before


@pytest.mark.dist
def test_config_json_not_an_object_is_an_error(run: Path, tmp_path: Path) -> None:
    (run / "config.json").write_text('["LlamaForCausalLM"]\n')
    dest = tmp_path / "out"
    assert_one_error(
        finalize(run, dest, "--dry-run"), dest, "config.json is not a JSON object", str(run / "config.json"), "list"
    )


@pytest.mark.dist
@pytest.mark.parametrize("name", ["generation_config.json", "tokenizer_config.json", "tokenizer.json"])
def test_truncated_companion_json_is_an_error(run: Path, tmp_path: Path, name: str) -> None:
    """Files read beside config.json or from the tokenizer dir: one error naming the file and the position."""
    path = run / name
    if not path.exists():  # the trainers save no generation_config.json: write the one a Trainer would
        path.write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1, "max_new_tokens": 8}, indent=2) + "\n")
    line, column = truncate(path)
    dest = tmp_path / "out"
    assert_one_error(finalize(run, dest), dest, f"{name} is not valid JSON", str(path), f"line {line} column {column}")


def test_broken_config_json_is_not_skipped(tmp_path: Path) -> None:
    """The nearest config.json does not parse: an error, not the one a level up, and not 'no config'."""
    src, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoints" / "checkpoint-1"
    ckpt.mkdir(parents=True)
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (ckpt / "config.json").write_text('{"model_type": "llama",\n "hidden_size": 6')
    with pytest.raises(SourceError, match=r"config.json is not valid JSON.*line 2 column 18"):
        find_model_config(ckpt, src)
    (ckpt / "config.json").write_text(json.dumps({"not": "a model config"}))  # valid JSON, another tool's: skipped
    assert find_model_config(ckpt, src) == src / "config.json"


def test_broken_adapter_config_is_an_error(tmp_path: Path) -> None:
    found = tmp_path / "adapter_config.json"
    found.write_text('{"peft_type": "LORA", "r": 8,\n\n  "lora_alpha": }')
    config = FinalizeConfig(src=tmp_path, dest=tmp_path / "out", lora=LoraOptions())
    with pytest.raises(SourceError, match=r"adapter_config.json is not valid JSON.*line 3 column 17") as info:
        load_lora_config(config, found, {"r": 8}, None)
    assert str(found) in str(info.value)
    found.write_text("[1, 2]")
    with pytest.raises(SourceError, match=r"adapter_config\.json is not a JSON object"):
        load_lora_config(config, found, {"r": 8}, None)
