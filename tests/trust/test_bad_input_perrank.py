"""Bad per-rank checkpoints never lose data: one clear line, non-zero exit, nothing at DEST, SRC unchanged.

Each case breaks a private copy of a real 2-rank save and finalizes it with 1 and 2 ranks: verl's
model_world_size_W_rank_R.pt files (examples/trainers/verl_fsdp.py, FSDP2 DTensors) and Accelerate FSDP1's
pytorch_model_fsdp_0_rank<R>.bin (examples/trainers/accelerate_fsdp1.py, ShardedTensors). Files of two steps of
one run with the same world size cannot be told apart (neither format records the step inside its files); files
of different saves are caught when their layout, world size or saving rank differs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from support import finalize, tree_digest
from test_bad_input import assert_clean_failure

pytestmark = pytest.mark.dist

ACTOR = Path("global_step_3") / "actor"


@pytest.fixture
def run(verl_runs: Path, tmp_path: Path) -> Path:
    """A private copy of the FSDP2 verl run that a test may break."""
    out = tmp_path / "run"
    shutil.copytree(verl_runs / "verl-fsdp2", out)
    return out


def model_file(run: Path, rank: int, world: int = 2) -> Path:
    return run / ACTOR / f"model_world_size_{world}_rank_{rank}.pt"


def truncate(run: Path, rank: int) -> None:
    os.truncate(model_file(run, rank), model_file(run, rank).stat().st_size // 2)


def one_rank_save(run: Path) -> None:
    """Rank 1's file removed and rank 0's renamed as a 1-rank save (fsdp_config.json agreeing): the DTensors
    inside still name a mesh of 2 ranks."""
    model_file(run, 1).unlink()
    model_file(run, 0).rename(model_file(run, 0, world=1))
    (run / ACTOR / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": 1}))


def other_save(verl_runs: Path) -> Callable[[Path], None]:
    """Rank 1's file replaced by rank 1's file of another save (the hybrid ddp x fsdp one)."""
    return lambda run: shutil.copyfile(verl_runs / "verl-hsdp2" / ACTOR / model_file(run, 1).name, model_file(run, 1))


class Payload:
    """Runs a shell command when plain pickle loads it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def with_payload(run: Path) -> None:
    """Rank 1's state dict saved again with a payload that would create a marker file beside SRC."""
    state = torch.load(model_file(run, 1), weights_only=False)  # the test's own file: trusted
    state["_payload"] = Payload(run.parent / "payload-ran")
    torch.save(state, model_file(run, 1))


def with_object(run: Path) -> None:
    """Rank 0's state dict saved again with an object torch's weights_only loader does not allow."""
    state = torch.load(model_file(run, 0), weights_only=False)  # the test's own file: trusted
    state["_extra"] = argparse.Namespace(callback="anything")
    torch.save(state, model_file(run, 0))


def breakages(verl_runs: Path) -> dict[str, tuple[Callable[[Path], None], tuple[str, ...]]]:
    return {
        "rank-file-missing": (lambda r: model_file(r, 1).unlink(), ("1 of 2 rank files missing", "rank_1.pt")),
        "rank0-truncated": (
            lambda r: truncate(r, 0),
            ("not a readable torch.save file", "rank_0.pt", "truncated or damaged"),
        ),
        "rank1-truncated": (lambda r: truncate(r, 1), ("not a readable torch.save file", "rank_1.pt")),
        "fsdp-config-world-size": (
            lambda r: (r / ACTOR / "fsdp_config.json").write_text('{"FSDP_version": 2, "world_size": 4}'),
            ("fsdp_config.json says world size 4",),
        ),
        "mesh-world-size": (one_rank_save, ("device mesh of 2 ranks, but 1 rank files are here",)),
        "mixed-world-sizes": (
            lambda r: shutil.copyfile(model_file(r, 0), model_file(r, 0, world=4)),
            ("model files of 2 saves, with world sizes [2, 4]",),
        ),
        "mixed-saves": (other_save(verl_runs), ("is split differently from rank 0's", "rank_1.pt")),
        "misplaced-file": (
            lambda r: shutil.copyfile(model_file(r, 0), model_file(r, 1)),
            ("was saved by rank 0, but the file name says rank 1", "rank_1.pt"),
        ),
        "code-payload": (with_payload, ("names posix.system, which distfinalize does not unpickle", "rank_1.pt")),
        "unsafe-object": (with_object, ("names argparse.Namespace, which distfinalize does not unpickle",)),
    }


CASES = [
    "code-payload",
    "misplaced-file",
    "rank-file-missing",
    "rank0-truncated",
    "rank1-truncated",
    "fsdp-config-world-size",
    "mesh-world-size",
    "mixed-world-sizes",
    "mixed-saves",
    "unsafe-object",
]


@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("breakage", CASES)
def test_broken_verl_checkpoint(verl_runs: Path, run: Path, tmp_path: Path, breakage: str, nproc: int) -> None:
    breaks, words = breakages(verl_runs)[breakage]
    breaks(run)
    before = tree_digest(run)
    dest = tmp_path / "out"
    assert_clean_failure(finalize(run, dest, nproc=nproc), dest, run, before, *words)
    assert not (run.parent / "payload-ran").exists()


ACCELERATE = Path("checkpoints") / "checkpoint-3"


def accelerate_file(run: Path, rank: int) -> Path:
    return run / ACCELERATE / f"pytorch_model_fsdp_0_rank{rank}.bin"


def accelerate_truncate(run: Path) -> None:
    os.truncate(accelerate_file(run, 1), accelerate_file(run, 1).stat().st_size // 2)


ACCELERATE_BREAKAGES: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "rank0-missing": (
        lambda r: accelerate_file(r, 0).unlink(),
        ("1 of 2 rank files missing (pytorch_model_fsdp_0_rank0.bin)",),
    ),
    "last-rank-missing": (
        lambda r: accelerate_file(r, 1).unlink(),
        ("records a save by 2 ranks, but 1 rank files are here",),
    ),
    "truncated": (accelerate_truncate, ("not a readable torch.save file", "rank1.bin", "truncated or damaged")),
    "extra-rank-file": (
        lambda r: shutil.copyfile(accelerate_file(r, 1), accelerate_file(r, 2)),
        ("records a save by 2 ranks, but 3 rank files are here",),
    ),
    "misplaced-file": (
        lambda r: shutil.copyfile(accelerate_file(r, 0), accelerate_file(r, 1)),
        ("was saved by rank 0, but the file name says rank 1", "rank1.bin"),
    ),
    "unsafe-object": (
        lambda r: torch.save({"x": argparse.Namespace(callback="anything")}, accelerate_file(r, 1)),
        ("names argparse.Namespace", "does not unpickle", "rank1.bin"),
    ),
}


@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("breakage", sorted(ACCELERATE_BREAKAGES))
def test_broken_accelerate_rank_files(accelerate_fsdp1_runs: Path, tmp_path: Path, breakage: str, nproc: int) -> None:
    run = tmp_path / "run"
    shutil.copytree(accelerate_fsdp1_runs / "accelerate1-sharded", run)
    breaks, words = ACCELERATE_BREAKAGES[breakage]
    breaks(run)
    before = tree_digest(run)
    dest = tmp_path / "out"
    assert_clean_failure(finalize(run, dest, nproc=nproc), dest, run, before, *words)
