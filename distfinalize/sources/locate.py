"""Find the checkpoint folder under SRC, and the config.json that describes its model.

SRC may be the checkpoint folder itself, a training output dir with checkpoints/checkpoint-N,
a Trainer dir with checkpoint-N, a torchtitan dir with (checkpoint/)step-N, or an Accelerate save dir
with pytorch_model_fsdp_0. The latest step wins unless --checkpoint names one. Runs on: all ranks.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from distfinalize.errors import SourceError
from distfinalize.sources import SourceFormat, detect_format

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^(?:checkpoint|step|global_step|iter)[-_]?(\d+)$")
STEP_PARENTS = ("", "checkpoints", "checkpoint")
NESTED_CHECKPOINTS = ("pytorch_model_fsdp_0",)  # Accelerate's FSDP SHARDED_STATE_DICT save
CONFIG_SEARCH_LEVELS_ABOVE_SRC = 2


@dataclass(frozen=True)
class Located:
    """The checkpoint folder chosen, its format and its training step (when the path tells it)."""

    path: Path
    format: SourceFormat
    step: int | None


def locate(src: Path, checkpoint: Path | None = None, tag: str | None = None) -> Located:
    """Pick the checkpoint folder to finalize. Raises SourceError with what was looked for.

    `tag` names a DeepSpeed tag folder (global_stepN) under SRC, instead of the one its `latest` file names.
    """
    if tag is not None and checkpoint is None:
        checkpoint = Path(tag)
    if not src.exists():
        raise SourceError("source does not exist", where=src, hint="check the SRC path")
    if not src.is_dir():
        raise SourceError("source is not a directory", where=src, hint="SRC must be a checkpoint folder")
    if checkpoint is not None:
        path = checkpoint if checkpoint.is_absolute() or checkpoint.exists() else src / checkpoint
        found = _resolve(path)
        if found is None:
            raise SourceError(
                "--checkpoint is not a checkpoint folder",
                where=path,
                hint="expected a DCP folder (.metadata + *.distcp) or one holding pytorch_model_fsdp_0/",
            )
        return found
    found = _resolve(src)
    if found is not None:
        return found
    steps = sorted(_step_candidates(src), key=lambda c: c.step or 0)
    if steps:
        chosen = steps[-1]
        log.debug("found %d checkpoints under %s; latest is %s", len(steps), src, chosen.path)
        return chosen
    raise SourceError(
        "no checkpoint found",
        where=src,
        hint="expected a DCP folder (.metadata + *.distcp), or checkpoint-N/, checkpoints/checkpoint-N/, "
        "step-N/ or pytorch_model_fsdp_0/ inside it; pass --checkpoint PATH to pick one",
    )


def _resolve(path: Path) -> Located | None:
    """`path` itself, or Accelerate's pytorch_model_fsdp_0 inside it, when a format recognises it."""
    for candidate in (path, *(path / n for n in NESTED_CHECKPOINTS)):
        if not candidate.is_dir():
            continue
        fmt = detect_format(candidate)
        if fmt is not None:
            return Located(candidate, fmt, _step_of(candidate))
    return None


def _step_candidates(src: Path) -> list[Located]:
    found = []
    for parent in STEP_PARENTS:
        base = src / parent if parent else src
        if not base.is_dir():
            continue
        for child in base.iterdir():
            if STEP_DIR.match(child.name):
                located = _resolve(child)
                if located is not None:
                    found.append(located)
                else:
                    log.debug("skipping %s: not a checkpoint folder", child)
    return found


def _step_of(path: Path) -> int | None:
    """The step number in the checkpoint folder's name, or its parent's (for pytorch_model_fsdp_0)."""
    for part in (path.name, path.parent.name):
        match = STEP_DIR.match(part)
        if match:
            return int(match.group(1))
    return None


def find_model_config(checkpoint: Path, src: Path) -> Path | None:
    """The nearest Hugging Face config.json: the checkpoint folder, its parents up to SRC, then a little above."""
    for directory in search_dirs(checkpoint, src):
        candidate = directory / "config.json"
        if candidate.is_file() and _is_hf_config(candidate):
            return candidate
    return None


def search_dirs(checkpoint: Path, src: Path) -> list[Path]:
    """Where files that go with a checkpoint (config, tokenizer) are looked for, nearest first."""
    ckpt, root = checkpoint.resolve(), src.resolve()
    parents = list(ckpt.parents)
    chain = [ckpt, *parents[: parents.index(root) + 1]] if root in parents else [ckpt, ckpt.parent, root]
    chain += list(root.parents)[:CONFIG_SEARCH_LEVELS_ABOVE_SRC]
    return list(dict.fromkeys(chain))


def _is_hf_config(path: Path) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and ("model_type" in data or "architectures" in data)
