"""Finding per-rank checkpoints (verl actor folders, Accelerate's per-rank files) under SRC, and the config.json
verl keeps in actor/huggingface/. Detection reads names only, so empty files stand in for the rank files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distfinalize.sources.locate import find_model_config, locate, search_dirs


def verl_actor(step_dir: Path, world: int = 2) -> Path:
    actor = step_dir / "actor"
    (actor / "huggingface").mkdir(parents=True)
    for rank in range(world):
        for kind in ("model", "optim", "extra_state"):
            (actor / f"{kind}_world_size_{world}_rank_{rank}.pt").write_bytes(b"")
    (actor / "huggingface" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return actor


@pytest.mark.parametrize("src_level", ["run", "step", "actor"])
def test_verl_actor_is_found_from_the_run_the_step_or_itself(tmp_path: Path, src_level: str) -> None:
    run = tmp_path / "run"
    verl_actor(run / "global_step_5")
    latest = verl_actor(run / "global_step_10")
    (run / "latest_checkpointed_iteration.txt").write_text("10")
    src = {"run": run, "step": latest.parent, "actor": latest}[src_level]
    found = locate(src)
    assert (found.path, found.format.name, found.step) == (latest, "verl", 10)
    assert search_dirs(latest, src)[0] == latest / "huggingface"
    assert find_model_config(latest, src) == latest / "huggingface" / "config.json"


@pytest.mark.parametrize(
    ("names", "fmt"),
    [
        (["pytorch_model_fsdp_0_rank0.bin", "pytorch_model_fsdp_0_rank1.bin"], "accelerate-fsdp-ranks"),
        (["pytorch_model_fsdp_rank0.bin", "pytorch_model_fsdp_rank1.bin"], "accelerate-fsdp-ranks"),
    ],
)
def test_accelerate_rank_files_are_found_in_checkpoint_n(tmp_path: Path, names: list[str], fmt: str) -> None:
    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint-7"
    ckpt.mkdir(parents=True)
    for name in names:
        (ckpt / name).write_bytes(b"")
    found = locate(tmp_path / "run")
    assert (found.path, found.format.name, found.step) == (ckpt, fmt, 7)
