"""verl / SkyRL FSDP checkpoints: `global_step_N/actor/` with `model_world_size_W_rank_R.pt` per training rank.

What verl's FSDPCheckpointManager writes there: every rank `torch.save`s `model.state_dict()` (FSDP2, or FSDP1
under SHARDED_STATE_DICT with a device mesh: DTensors sharded over ("fsdp",) or ("ddp", "fsdp")), its optimizer
state (`optim_world_size_W_rank_R.pt`) and `extra_state_world_size_W_rank_R.pt` (scheduler, RNG: not read);
rank 0 adds `huggingface/` (config.json, the tokenizer, generation config when the base model had one, model
code) and `fsdp_config.json` (`{"FSDP_version", "world_size"}`). With LoRA, the rank files hold the PeftModel
(`base_model.model....lora_A.default.weight`) and `lora_adapter/` holds adapter_config.json.
Runs on: all ranks (metadata), each rank for its own tensors (reads).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from distfinalize.errors import SourceError
from distfinalize.sources import SourceFormat
from distfinalize.sources.rankfiles import RankFilesSource, files_in_rank_order

MODEL_FILE = re.compile(r"^model_world_size_(\d+)_rank_(\d+)\.pt$")
FSDP_CONFIG = "fsdp_config.json"

HINT = "finalize another global_step_N (pass --checkpoint), or restore this one"


def is_verl_checkpoint(path: Path) -> bool:
    """A verl actor folder holds model_world_size_W_rank_R.pt files (names only are read)."""
    try:
        return path.is_dir() and any(MODEL_FILE.match(p.name) for p in path.iterdir())
    except OSError:
        return False


def model_files(path: Path) -> tuple[Path, ...]:
    """The model files of every rank, in rank order; refuses mixed world sizes, missing ranks and a world size
    that fsdp_config.json contradicts."""
    found: dict[int, dict[int, Path]] = {}
    for p in path.iterdir():
        match = MODEL_FILE.match(p.name)
        if match:
            found.setdefault(int(match.group(1)), {})[int(match.group(2))] = p
    if len(found) > 1:
        sizes = sorted(found)
        raise SourceError(
            f"the folder holds model files of {len(sizes)} saves, with world sizes {sizes}",
            where=path,
            hint="keep the files of one save (model_world_size_W_rank_*.pt for a single W), or finalize another "
            "global_step_N",
        )
    world, ranks = next(iter(found.items()))
    files = files_in_rank_order(path, world, ranks, lambda r: f"model_world_size_{world}_rank_{r}.pt", HINT)
    _check_fsdp_config(path, world)
    return files


def _check_fsdp_config(path: Path, world: int) -> None:
    config = path / FSDP_CONFIG
    if not config.is_file():
        return
    try:
        saved = json.loads(config.read_text(encoding="utf-8")).get("world_size")
    except (OSError, ValueError, AttributeError) as exc:
        raise SourceError(f"cannot read {FSDP_CONFIG}", where=config, hint=str(exc)) from exc
    if saved != world:
        raise SourceError(
            f"{FSDP_CONFIG} says world size {saved}, but the model files are model_world_size_{world}_rank_*.pt",
            where=config,
            hint=f"the folder mixes files of different saves; {HINT}",
        )


def open_verl(path: Path, step: int | None) -> RankFilesSource:
    """The actor folder as a Source. Runs on: all ranks."""
    return RankFilesSource(path, model_files(path), "verl", step, HINT)


VERL_FORMAT = SourceFormat("verl", "verl / SkyRL per-rank files", is_verl_checkpoint, open_verl)
