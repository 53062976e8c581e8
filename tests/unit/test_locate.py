"""Finding the checkpoint under SRC in every layout trainers leave, and the config.json that goes with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distfinalize.errors import SourceError
from distfinalize.sources.locate import find_model_config, locate


def dcp_dir(path: Path) -> Path:
    """A folder the DCP format recognises (detection reads only the names)."""
    path.mkdir(parents=True)
    (path / ".metadata").write_bytes(b"")
    (path / "__0_0.distcp").write_bytes(b"")
    return path


@pytest.mark.parametrize(
    ("layout", "expected", "step"),
    [
        (["."], ".", None),
        (["checkpoints/checkpoint-9", "checkpoints/checkpoint-10"], "checkpoints/checkpoint-10", 10),
        (["checkpoint-100", "checkpoint-20"], "checkpoint-100", 100),
        (["checkpoint/step-5", "checkpoint/step-50"], "checkpoint/step-50", 50),
        (["step-7"], "step-7", 7),
        (["pytorch_model_fsdp_0"], "pytorch_model_fsdp_0", None),
        (
            ["checkpoint-3/pytorch_model_fsdp_0", "checkpoint-2/pytorch_model_fsdp_0"],
            "checkpoint-3/pytorch_model_fsdp_0",
            3,
        ),
    ],
)
def test_latest_checkpoint_is_found(tmp_path: Path, layout: list[str], expected: str, step: int | None) -> None:
    src = tmp_path / "run"
    for rel in layout:
        dcp_dir(src / rel) if rel != "." else dcp_dir(src)
    found = locate(src)
    assert found.path == (src / expected if expected != "." else src)
    assert found.format.name == "dcp" and found.step == step


def test_explicit_checkpoint_wins(tmp_path: Path) -> None:
    src = tmp_path / "run"
    dcp_dir(src / "checkpoint-1")
    dcp_dir(src / "checkpoint-2")
    assert locate(src, Path("checkpoint-1")).path == src / "checkpoint-1"
    with pytest.raises(SourceError, match="--checkpoint is not a checkpoint folder"):
        locate(src, Path("checkpoint-7"))


def test_steps_without_checkpoint_files_are_skipped(tmp_path: Path) -> None:
    src = tmp_path / "run"
    dcp_dir(src / "checkpoint-1")
    (src / "checkpoint-2").mkdir()  # an interrupted save: no .metadata
    assert locate(src).path == src / "checkpoint-1"


@pytest.mark.parametrize(
    ("make", "message"), [("missing", "does not exist"), ("file", "not a directory"), ("empty", "no checkpoint found")]
)
def test_clear_errors(tmp_path: Path, make: str, message: str) -> None:
    src = tmp_path / "src"
    if make == "file":
        src.write_text("x")
    elif make == "empty":
        src.mkdir()
    with pytest.raises(SourceError, match=message) as info:
        locate(src)
    assert str(src) in str(info.value)


def test_config_found_in_nearest_parent(tmp_path: Path) -> None:
    src = tmp_path / "run"
    ckpt = dcp_dir(src / "checkpoints" / "checkpoint-4")
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (src / "checkpoints" / "config.json").write_text(json.dumps({"not": "a model config"}))
    assert find_model_config(ckpt, src) == src / "config.json"
    (ckpt / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert find_model_config(ckpt, src) == ckpt / "config.json"


def test_no_config(tmp_path: Path) -> None:
    src = dcp_dir(tmp_path / "a" / "b" / "c" / "run")
    assert find_model_config(src, src) is None
