"""FinalizeCallback picks the checkpoint the Trainer's state names: the best one when it tracks one, else the last
checkpoint-N of output_dir; none saved is one clear error. Real TrainingArguments / TrainerState, real DCP saves
of a tiny model (one process; the 2-rank run inside a TRL job is tests/multirank/test_trl.py)."""

from __future__ import annotations

from pathlib import Path

import common
import pytest
import torch.distributed.checkpoint as dcp
from support import read_json
from transformers import TrainerControl, TrainerState, TrainingArguments

from distfinalize import FinalizeCallback
from distfinalize.errors import SourceError


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Trainer output dir with config.json and checkpoint-1, checkpoint-2 (DCP saves of different weights)."""
    out = tmp_path_factory.mktemp("trainer") / "out"
    for step in (1, 2):
        state = {k: v.clone() for k, v in common.build_model(tie=False, seed=step).state_dict().items()}
        dcp.save(state, checkpoint_id=str(out / f"checkpoint-{step}"), no_dist=True)
    common.tiny_config(tie=False).save_pretrained(out)
    return out


def train_end(callback: FinalizeCallback, out: Path, best: Path | None) -> None:
    args = TrainingArguments(output_dir=str(out), report_to=[], use_cpu=True)
    state = TrainerState(best_model_checkpoint=str(best) if best else None)
    callback.on_train_end(args, state, TrainerControl())


@pytest.mark.parametrize("best", [None, "checkpoint-1"])
def test_finalizes_last_or_best(output_dir: Path, tmp_path: Path, best: str | None) -> None:
    callback = FinalizeCallback(tmp_path / "model", max_shard_size="100KB")
    train_end(callback, output_dir, output_dir / best if best else None)
    manifest = read_json(tmp_path / "model" / "distfinalize-manifest.json")
    assert manifest["source"]["path"] == (best or "checkpoint-2")
    assert callback.outcome is not None and callback.outcome.dest == tmp_path / "model"


def test_no_checkpoint_saved(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(SourceError, match="the Trainer saved no checkpoint to finalize"):
        train_end(FinalizeCallback(tmp_path / "model"), tmp_path / "out", None)
    assert not (tmp_path / "model").exists()
