"""A DeepSpeed tag folder's files, found and checked (ranks, TP, pipeline and expert files refused by name)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from distfinalize.errors import SourceError
from distfinalize.sources.deepspeed.meta import (
    FALLBACK_CONSTANTS,
    constants,
)

TP_FILE = re.compile(r"mp_rank_(\d+)")
PIPELINE_FILE = re.compile(r"^layer_\d+-model_\d+-model_states\.pt$")
EXPERT_FILE = re.compile(r"^(?:expp_rank_\d+|layer_\d+_expert_\d+)_")
MAX_NAMES_IN_ERROR = 4


@dataclass(frozen=True)
class TagFiles:
    """The files of a tag folder: model states (one, or one per rank for ZeRO 3) and optimizer states per rank."""

    model_states: tuple[Path, ...]
    optim_states: tuple[Path, ...]


def is_deepspeed_checkpoint(path: Path) -> bool:
    """A DeepSpeed tag folder holds *_model_states.pt files (names only are read)."""
    suffix = FALLBACK_CONSTANTS["MODEL_FILE_SUFFIX"]
    try:
        return path.is_dir() and any(p.name.endswith(suffix) or PIPELINE_FILE.match(p.name) for p in path.iterdir())
    except OSError:
        return False


def tag_files(path: Path) -> TagFiles:
    """The model and optimizer states files of `path`; refuses tensor/pipeline/expert-parallel layouts."""
    c = constants()
    names = sorted(p.name for p in path.iterdir() if p.is_file() and p.name.endswith(".pt"))
    tp = sorted({int(m.group(1)) for n in names if (m := TP_FILE.search(n))} - {0})
    if tp:
        shown = [n for n in names if TP_FILE.search(n) and int(TP_FILE.search(n).group(1)) != 0]
        raise SourceError(
            f"tensor-parallel DeepSpeed checkpoint ({max(tp) + 1} model-parallel ranks: found {_sample(shown)})",
            where=path,
            hint="distfinalize reads ZeRO data-parallel checkpoints (mp_rank_00 only); merge the tensor-parallel "
            "shards first, e.g. with DeepSpeed's ds_to_universal.py",
        )
    experts = [n for n in names if EXPERT_FILE.match(n)]
    if experts:
        raise SourceError(
            f"expert-parallel (MoE) DeepSpeed checkpoint (found {_sample(experts)})",
            where=path,
            hint="MoE expert checkpoints are not supported yet; convert them with DeepSpeed's ds_to_universal.py",
        )
    layers = [n for n in names if PIPELINE_FILE.match(n)]
    if layers:
        raise SourceError(
            f"pipeline-parallel DeepSpeed checkpoint ({len(layers)} layer files: {_sample(layers)})",
            where=path,
            hint="distfinalize reads ZeRO data-parallel checkpoints; convert pipeline checkpoints with DeepSpeed's "
            "ds_to_universal.py first",
        )
    zero, mp = re.escape(c.ZERO_FILE_PREFIX), re.escape(c.MODEL_FILE_PREFIX)
    model_pattern = re.compile(rf"^{zero}(\d+)_{mp}00{re.escape(c.MODEL_FILE_SUFFIX)}$")
    optim_pattern = re.compile(rf"^(?:bf16_|fp16_)?{zero}(\d+)_{mp}00{re.escape(c.OPTIM_FILE_SUFFIX)}$")
    zero3_model = _by_rank(path, names, model_pattern, "model states")
    single_model = path / f"{c.MODEL_FILE_PREFIX}00{c.MODEL_FILE_SUFFIX}"
    model_states = zero3_model or ((single_model,) if single_model.is_file() else ())
    optim = _by_rank(path, names, optim_pattern, "optimizer states")
    if not model_states:
        raise SourceError(
            "no mp_rank_00_model_states.pt or zero_pp_rank_*_mp_rank_00_model_states.pt",
            where=path,
            hint="the DeepSpeed checkpoint is incomplete; pick another tag with --tag",
        )
    if not optim:
        raise SourceError(
            "no *_optim_states.pt files: the fp32 weights of a ZeRO checkpoint live in its optimizer states",
            where=path,
            hint="save the checkpoint with its optimizer state (engine.save_checkpoint does by default)",
        )
    return TagFiles(model_states, optim)


def _by_rank(path: Path, names: Iterable[str], pattern: re.Pattern, what: str) -> tuple[Path, ...]:
    """Files matching `pattern` (group 1 = rank), in rank order; every rank from 0 up must be there."""
    found = {int(m.group(1)): path / n for n in names if (m := pattern.match(n))}
    if not found:
        return ()
    missing = sorted(set(range(max(found) + 1)) - found.keys())
    if missing:
        raise SourceError(
            f"DeepSpeed checkpoint is missing the {what} files of rank(s) {missing[:MAX_NAMES_IN_ERROR]} "
            f"(found {len(found)} of ranks 0-{max(found)})",
            where=path,
            hint="a rank did not finish saving; pick another tag with --tag",
        )
    return tuple(found[r] for r in sorted(found))


def _sample(names: Sequence[str]) -> str:
    return ", ".join(names[:MAX_NAMES_IN_ERROR]) + (", ..." if len(names) > MAX_NAMES_IN_ERROR else "")
