"""distfinalize.finalize's options and failures, and the package's lazy import (no process group here: a single
process; the 2-rank run inside a training job is tests/multirank/test_trl.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from support import env

import distfinalize
from distfinalize.api import config_from
from distfinalize.errors import DistfinalizeError, SourceError, UsageError


def test_import_is_cheap() -> None:
    code = "import sys, distfinalize; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(), check=True)
    assert out.stdout.strip() == "[]"


def test_options_are_the_command_lines(tmp_path: Path) -> None:
    config = config_from(
        tmp_path / "src",
        tmp_path / "dest",
        {
            "base_model": "org/base",
            "merge_lora": True,
            "tensors_only": False,
            "max_shard_size": "2MB",
            "dataset": ["a", "b"],
            "lora_target_modules": ["q_proj", "v_proj"],
            "lora_alpha": 16,
            "checkpoint": tmp_path / "ckpt",
            "dtype": None,
        },
    )
    assert config.base_model == Path("org/base") and config.lora.merge and not config.tensors_only
    assert config.max_shard_size == 2 * 10**6 and config.card.datasets == ("a", "b")
    assert config.lora.target_modules == ("q_proj", "v_proj") and config.lora.alpha == 16.0
    assert config.checkpoint == tmp_path / "ckpt" and config.dtype is None


@pytest.mark.parametrize(
    ("options", "message"),
    [({"no_such_option": 1}, "unknown option 'no_such_option'"), ({"dtype": "float64"}, "invalid choice")],
)
def test_bad_options_raise(tmp_path: Path, options: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        distfinalize.finalize(tmp_path / "src", tmp_path / "dest", **options)


def test_failure_raises_and_writes_nothing(tmp_path: Path) -> None:
    """A failure is an exception (no exit, no process group left behind), DEST absent."""
    with pytest.raises(SourceError, match="source does not exist") as caught:
        distfinalize.finalize(tmp_path / "missing", tmp_path / "dest")
    assert (
        isinstance(caught.value, distfinalize.DistfinalizeError) and DistfinalizeError is distfinalize.DistfinalizeError
    )
    assert not (tmp_path / "dest").exists()
    import torch.distributed as dist

    assert not dist.is_initialized()
