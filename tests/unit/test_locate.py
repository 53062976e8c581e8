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


def ds_tag(path: Path, stage: int = 2) -> Path:
    """A folder the DeepSpeed format recognises (detection reads only the names)."""
    path.mkdir(parents=True)
    model = "zero_pp_rank_0_mp_rank_00_model_states.pt" if stage == 3 else "mp_rank_00_model_states.pt"
    for name in (model, "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        (path / name).write_bytes(b"")
    return path


def ds_save_dir(path: Path, tags: list[str], latest: str | None) -> Path:
    """What engine.save_checkpoint(path) leaves: tag folders and a `latest` file naming one."""
    for tag in tags:
        ds_tag(path / tag)
    if latest is not None:
        (path / "latest").write_text(latest)
    return path


def test_deepspeed_latest_names_the_tag(tmp_path: Path) -> None:
    src = ds_save_dir(tmp_path / "run", ["global_step5", "global_step7"], latest="global_step5")
    found = locate(src)
    assert found.path == src / "global_step5" and found.format.name == "deepspeed" and found.step == 5


def test_deepspeed_without_latest_takes_the_highest_step(tmp_path: Path) -> None:
    src = ds_save_dir(tmp_path / "run", ["global_step5", "global_step12"], latest=None)
    assert locate(src).path == src / "global_step12"


def test_deepspeed_latest_naming_a_missing_tag_falls_back(tmp_path: Path) -> None:
    src = ds_save_dir(tmp_path / "run", ["global_step5"], latest="global_step9")
    assert locate(src).path == src / "global_step5"


def test_deepspeed_tag_folder_itself(tmp_path: Path) -> None:
    tag = ds_tag(tmp_path / "run" / "global_step3", stage=3)
    found = locate(tag)
    assert found.path == tag and found.step == 3


def test_deepspeed_inside_trainer_checkpoints(tmp_path: Path) -> None:
    src = tmp_path / "output"
    ds_save_dir(src / "checkpoint-3", ["global_step3"], latest="global_step3")
    ds_save_dir(src / "checkpoint-10", ["global_step10"], latest="global_step10")
    found = locate(src)
    assert found.path == src / "checkpoint-10" / "global_step10" and found.step == 10
    assert locate(src / "checkpoint-3").path == src / "checkpoint-3" / "global_step3"


def test_tag_overrides_latest(tmp_path: Path) -> None:
    src = ds_save_dir(tmp_path / "run", ["global_step5", "global_step7"], latest="global_step7")
    assert locate(src, tag="global_step5").path == src / "global_step5"
    trainer = tmp_path / "output"
    ds_save_dir(trainer / "checkpoint-3", ["global_step3"], latest="global_step3")
    ds_save_dir(trainer / "checkpoint-10", ["global_step9", "global_step10"], latest="global_step10")
    assert locate(trainer, tag="global_step9").path == trainer / "checkpoint-10" / "global_step9"
    assert locate(trainer, tag="global_step3").path == trainer / "checkpoint-3" / "global_step3"
    assert locate(trainer, Path("checkpoint-10"), tag="global_step9").path == trainer / "checkpoint-10" / "global_step9"


def test_unknown_tag_lists_the_tags_found(tmp_path: Path) -> None:
    src = ds_save_dir(tmp_path / "run", ["global_step5", "global_step7"], latest="global_step7")
    with pytest.raises(SourceError, match="--tag global_step6 names no checkpoint folder") as info:
        locate(src, tag="global_step6")
    assert "global_step5, global_step7" in str(info.value) and str(src) in str(info.value)
    with pytest.raises(SourceError, match="--tag global_step6 names no checkpoint folder"):
        locate(src, Path("global_step5"), tag="global_step6")


def hf_dir(path: Path, weights: str = "model.safetensors") -> Path:
    """A Hugging Face model dir (detection reads only the names), with a Trainer's other checkpoint files."""
    path.mkdir(parents=True)
    for name in (weights, "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
        (path / name).write_bytes(b"")
    return path


@pytest.mark.parametrize(
    ("weights", "fmt"),
    [
        ("model.safetensors", "safetensors"),
        ("model.safetensors.index.json", "safetensors"),
        ("shard-00001-model-00001-of-00001.safetensors", "safetensors"),
        ("pytorch_model.bin", "pytorch-bin"),
        ("pytorch_model.bin.index.json", "pytorch-bin"),
    ],
)
def test_hugging_face_dirs_and_trainer_checkpoints(tmp_path: Path, weights: str, fmt: str) -> None:
    src = tmp_path / "out"
    hf_dir(src / "checkpoint-4", weights)
    hf_dir(src / "checkpoint-12", weights)
    found = locate(src)
    assert found.path == src / "checkpoint-12" and found.format.name == fmt and found.step == 12


def test_safetensors_win_over_bin(tmp_path: Path) -> None:
    src = hf_dir(tmp_path / "model", "pytorch_model.bin")
    (src / "model.safetensors").write_bytes(b"")
    assert locate(src).format.name == "safetensors"


def test_deepspeed_tag_wins_over_the_16bit_model_beside_it(tmp_path: Path) -> None:
    """A Trainer's checkpoint-N under ZeRO-3 with stage3_gather_16bit_weights_on_model_save: the fp32 masters."""
    ckpt = hf_dir(tmp_path / "out" / "checkpoint-5")
    ds_save_dir(ckpt, ["global_step5"], latest="global_step5")
    found = locate(tmp_path / "out")
    assert found.path == ckpt / "global_step5" and found.format.name == "deepspeed"


def test_a_model_at_src_wins_over_its_checkpoints(tmp_path: Path) -> None:
    """The Trainer's output_dir after save_model(): the final model, not its checkpoint-N folders."""
    src = hf_dir(tmp_path / "out")
    hf_dir(src / "checkpoint-8")
    assert locate(src).path == src


@pytest.mark.parametrize("where", ["run/ckpt", "saves/final", "checkpoint/dcp-export", "a/global_step_5x"])
def test_one_checkpoint_under_any_name_two_levels_down(tmp_path: Path, where: str) -> None:
    src = tmp_path / "src"
    dcp_dir(src / where)
    (src / "logs").mkdir()
    found = locate(src)
    assert found.path == src / where


def test_step_folders_under_an_unknown_parent_latest_wins(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for step in (3, 30, 7):
        hf_dir(src / "trainer_out" / f"checkpoint-{step}")
    assert locate(src).path == src / "trainer_out" / "checkpoint-30"


def test_several_checkpoints_are_listed_with_how_to_pick(tmp_path: Path) -> None:
    src = tmp_path / "src"
    dcp_dir(src / "a" / "dcp")
    hf_dir(src / "b")
    with pytest.raises(SourceError) as info:
        locate(src)
    message = str(info.value)
    assert "2 checkpoints found (a/dcp, b)" in message and "--checkpoint a/dcp" in message
    assert locate(src, Path("b")).path == src / "b"


def test_three_levels_down_is_not_searched(tmp_path: Path) -> None:
    src = tmp_path / "src"
    dcp_dir(src / "a" / "b" / "c")
    with pytest.raises(SourceError, match="no checkpoint found"):
        locate(src)
