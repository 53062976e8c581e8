"""Accelerate FSDP1 per-rank model files, in the folder `save_state` / `save_fsdp_model` writes to.

- `fsdp_state_dict_type: SHARDED_STATE_DICT` saved without DCP (`save_fsdp_model(..., use_dcp=False)`): every
  rank `torch.save`s its sharded state dict as `pytorch_model_fsdp_0_rank<R>.bin` (FSDP1: ShardedTensors whose
  metadata lists every rank's shard; FSDP2: DTensors). Read like verl's files (rankfiles.py).
- `fsdp_state_dict_type: LOCAL_STATE_DICT` (`pytorch_model_fsdp_rank<R>.bin`): each rank's shard of FSDP's
  flattened parameters. How a flat parameter splits into the model's tensors (their order, shapes and padding) is
  FSDP's in-memory bookkeeping and is not saved, so these are refused with the setting to use instead.
Runs on: all ranks (metadata), each rank for its own tensors (reads).
"""

from __future__ import annotations

import re
from pathlib import Path

from distfinalize.errors import SourceError
from distfinalize.sources import SourceFormat
from distfinalize.sources.rankfiles import RankFilesSource, files_in_rank_order

SHARDED_FILE = re.compile(r"^pytorch_model_fsdp_0_rank(\d+)\.bin$")
LOCAL_FILE = re.compile(r"^pytorch_model_fsdp_rank(\d+)\.bin$")
FLAT_PARAM = "_flat_param"
HINT = "finalize another checkpoint-N (pass --checkpoint), or restore this one"
LOCAL_REFUSAL = (
    "Accelerate FSDP LOCAL_STATE_DICT checkpoint: its files hold FSDP's flattened parameter shards, and how they "
    "split into the model's tensors is not saved"
)
LOCAL_HINT = (
    "save with fsdp_state_dict_type: SHARDED_STATE_DICT (or FULL_STATE_DICT) in the Accelerate FSDP config, then "
    "finalize that checkpoint"
)


def is_accelerate_rank_checkpoint(path: Path) -> bool:
    """A folder with Accelerate's per-rank model files, sharded or local (names only are read)."""
    try:
        return path.is_dir() and any(SHARDED_FILE.match(p.name) or LOCAL_FILE.match(p.name) for p in path.iterdir())
    except OSError:
        return False


def rank_files(path: Path) -> tuple[Path, ...]:
    """The SHARDED_STATE_DICT files of model 0, in rank order; LOCAL_STATE_DICT and missing ranks refused."""
    sharded, local = {}, {}
    for p in path.iterdir():
        if match := SHARDED_FILE.match(p.name):
            sharded[int(match.group(1))] = p
        elif match := LOCAL_FILE.match(p.name):
            local[int(match.group(1))] = p
    if not sharded:
        raise SourceError(LOCAL_REFUSAL, where=path, hint=LOCAL_HINT)
    world = max(sharded) + 1
    return files_in_rank_order(path, world, sharded, lambda r: f"pytorch_model_fsdp_0_rank{r}.bin", HINT)


def open_accelerate_ranks(path: Path, step: int | None) -> RankFilesSource:
    """The save folder as a Source. Runs on: all ranks."""
    source = RankFilesSource(path, rank_files(path), "accelerate-fsdp-ranks", step, HINT)
    flat = [k for k in source.stored if k.rsplit(".", 1)[-1] == FLAT_PARAM]
    if flat:
        raise SourceError(LOCAL_REFUSAL + f" (found {flat[0]!r})", where=source.files[0], hint=LOCAL_HINT)
    return source


ACCELERATE_RANKS_FORMAT = SourceFormat(
    "accelerate-fsdp-ranks", "Accelerate FSDP1 per-rank files", is_accelerate_rank_checkpoint, open_accelerate_ranks
)
