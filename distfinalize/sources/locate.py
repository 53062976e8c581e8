"""Find the checkpoint folder under SRC, and the config.json that describes its model.

SRC may be the checkpoint folder itself, a training output dir with checkpoints/checkpoint-N,
a Trainer dir with checkpoint-N, a torchtitan dir with (checkpoint/)step-N, an Accelerate save dir
with pytorch_model_fsdp_0, a DeepSpeed save dir (a `latest` file naming a global_stepN tag folder),
also inside a Trainer's checkpoint-N, or a Hugging Face model dir (the weights a Trainer's checkpoint-N or
save_pretrained holds). The latest step wins unless --checkpoint names one; for DeepSpeed the tag in `latest`,
unless --tag names another. Failing all that, the one checkpoint folder up to two levels below SRC, whatever
its name, is used; several are listed, for --checkpoint to pick one. Runs on: all ranks.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from distfinalize.errors import SourceError
from distfinalize.sources import SourceFormat
from distfinalize.sources.formats import detect_format

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^(?:checkpoint|step|global_step|iter)[-_]?(\d+)$")
STEP_PARENTS = ("", "checkpoints", "checkpoint")
NESTED_CHECKPOINTS = ("pytorch_model_fsdp_0", "actor")  # Accelerate's FSDP SHARDED_STATE_DICT save; verl's actor
COMPANION_DIRS = ("huggingface", "lora_adapter")  # beside a verl actor's rank files: config, tokenizer, adapter
LATEST_TAG_FILE = "latest"  # DeepSpeed's save dir: the name of the newest tag folder
CONFIG_SEARCH_LEVELS_ABOVE_SRC = 2
SEARCH_DEPTH = 2  # how many levels below SRC a checkpoint folder under any name is looked for
MAX_LISTED = 6  # checkpoint folders named in the error when several are found


@dataclass(frozen=True)
class Located:
    """The checkpoint folder chosen, its format and its training step (when the path tells it)."""

    path: Path
    format: SourceFormat
    step: int | None


def locate(src: Path, checkpoint: Path | None = None, tag: str | None = None) -> Located:
    """Pick the checkpoint folder to finalize. Raises SourceError with what was looked for.

    `tag` names a DeepSpeed tag folder (global_stepN) instead of the one the `latest` file names: inside
    --checkpoint when given, else inside SRC or the newest of its checkpoint-N folders that has it.
    """
    if not src.exists():
        raise SourceError("source does not exist", where=src, hint="check the SRC path")
    if not src.is_dir():
        raise SourceError("source is not a directory", where=src, hint="SRC must be a checkpoint folder")
    if checkpoint is not None:
        path = checkpoint if checkpoint.is_absolute() or checkpoint.exists() else src / checkpoint
        found = _resolve_tag(path, tag) if tag is not None else _resolve(path)
        if found is None and tag is not None:
            raise _tag_error(tag, path, [path])
        if found is None:
            raise SourceError(
                "--checkpoint is not a checkpoint folder",
                where=path,
                hint="expected a DCP folder (.metadata + *.distcp), a DeepSpeed tag folder (global_stepN), one "
                "holding pytorch_model_fsdp_0/ or a DeepSpeed `latest` file, or a Hugging Face model dir",
            )
        return found
    if tag is not None:
        return _locate_tag(src, tag)
    found = _resolve(src)
    if found is not None:
        return found
    steps = sorted(_step_candidates(src), key=lambda c: c.step or 0)
    if steps:
        chosen = steps[-1]
        log.debug("found %d checkpoints under %s; latest is %s", len(steps), src, chosen.path)
        return chosen
    return _search(src)


def _search(src: Path) -> Located:
    """The one checkpoint folder within SEARCH_DEPTH levels below SRC (the latest, when all are step folders of
    one parent); none or several is a SourceError, the latter listing them."""
    found = _found_below(src, SEARCH_DEPTH)
    parents = {c.path.parent for c in found}
    if len(found) > 1 and len(parents) == 1 and all(c.step is not None for c in found):
        found = [max(found, key=lambda c: c.step or 0)]
    if len(found) == 1:
        log.info("found one checkpoint under %s: using %s", src, found[0].path.relative_to(src))
        return found[0]
    if found:
        names = [str(c.path.relative_to(src)) for c in sorted(found, key=lambda c: str(c.path))]
        more = len(names) - MAX_LISTED
        shown = ", ".join(names[:MAX_LISTED]) + (f" and {more} more" if more > 0 else "")
        raise SourceError(
            f"{len(found)} checkpoints found ({shown})",
            where=src,
            hint=f"pass --checkpoint {names[0]} (or another of them) to pick one",
        )
    raise SourceError(
        "no checkpoint found",
        where=src,
        hint="expected a DCP folder (.metadata + *.distcp), a DeepSpeed tag folder (global_stepN), a Hugging Face "
        "model dir (model.safetensors, pytorch_model.bin or their index), or one of them up to two levels below "
        "SRC; pass --checkpoint PATH to pick one",
    )


def _found_below(directory: Path, depth: int) -> list[Located]:
    """Checkpoint folders below `directory`, at most `depth` levels down, not looking inside one found."""
    found: list[Located] = []
    if depth <= 0:
        return found
    try:
        children = sorted(c for c in directory.iterdir() if c.is_dir() and not c.name.startswith("."))
    except OSError:
        return found
    for child in children:
        located = _resolve(child)
        if located is not None:
            found.append(located)
        else:
            found += _found_below(child, depth - 1)
    return found


def _resolve(path: Path) -> Located | None:
    """`path` itself, the DeepSpeed tag its `latest` file names, or Accelerate's pytorch_model_fsdp_0 inside it;
    else the model weights saved in `path` (a Hugging Face model dir): a Trainer's checkpoint-N under DeepSpeed
    holds both, and the ZeRO tag (the fp32 master weights) wins."""
    latest = _latest_tag(path)
    nested = (path / latest,) if latest else ()
    for candidate in (path, *nested, *(path / n for n in NESTED_CHECKPOINTS)):
        if not candidate.is_dir():
            continue
        fmt = detect_format(candidate, fallback=False)
        if fmt is not None:
            return Located(candidate, fmt, _step_of(candidate))
    if latest:
        log.warning("%s names tag %r, which is not a checkpoint folder there", path / LATEST_TAG_FILE, latest)
    fmt = detect_format(path, fallback=True) if path.is_dir() else None
    return Located(path, fmt, _step_of(path)) if fmt is not None else None


def _latest_tag(path: Path) -> str | None:
    """The tag DeepSpeed's `latest` file in `path` names, if there is one."""
    try:
        tag = (path / LATEST_TAG_FILE).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return tag if tag and "/" not in tag and tag not in (".", "..") else None


def _resolve_tag(path: Path, tag: str) -> Located | None:
    """The tag folder `tag` inside `path` (or `path` itself when it is that tag folder)."""
    candidates = [path / tag, path] if path.name == tag else [path / tag]
    for candidate in candidates:
        if candidate.is_dir():
            fmt = detect_format(candidate)
            if fmt is not None:
                return Located(candidate, fmt, _step_of(candidate))
    return None


def _locate_tag(src: Path, tag: str) -> Located:
    """--tag without --checkpoint: in SRC, else in the newest checkpoint-N (or step-N) folder under SRC holding it."""
    dirs = [src, *sorted(_step_dirs(src), key=lambda d: -(_step_of(d) or 0))]
    for directory in dirs:
        found = _resolve_tag(directory, tag)
        if found is not None:
            return found
    raise _tag_error(tag, src, dirs)


def _tag_error(tag: str, where: Path, dirs: list[Path]) -> SourceError:
    tags = sorted(
        {str(c.relative_to(where)) for d in dirs if d.is_dir() for c in d.iterdir() if _is_tag_folder(c)},
    )
    shown = ", ".join(tags[:6]) + (", ..." if len(tags) > 6 else "") if tags else "none"
    return SourceError(f"--tag {tag} names no checkpoint folder", where=where, hint=f"tags found: {shown}")


def _is_tag_folder(path: Path) -> bool:
    return path.is_dir() and detect_format(path) is not None


def _step_dirs(src: Path) -> list[Path]:
    """Folders named like steps (checkpoint-N, step-N, global_stepN, ...) in SRC and its checkpoint(s)/ dirs."""
    found = []
    for parent in STEP_PARENTS:
        base = src / parent if parent else src
        if base.is_dir():
            found += [child for child in base.iterdir() if child.is_dir() and STEP_DIR.match(child.name)]
    return found


def _step_candidates(src: Path) -> list[Located]:
    found = []
    for child in _step_dirs(src):
        located = _resolve(child)
        if located is not None:
            found.append(located)
        else:
            log.debug("skipping %s: not a checkpoint folder", child)
    return found


def _step_of(path: Path) -> int | None:
    """The step number in the checkpoint folder's name, or its parent's (pytorch_model_fsdp_0, a DeepSpeed tag)."""
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
    companions = [ckpt / name for name in COMPANION_DIRS if (ckpt / name).is_dir()]
    return list(dict.fromkeys([*companions, *chain]))


def _is_hf_config(path: Path) -> bool:
    """Whether a config.json describes a transformers model; one that does not parse, or is not a JSON object,
    is an error (SourceError naming it), never taken for an absent config."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        hint = f"{exc.msg} at line {exc.lineno} column {exc.colno}; fix or replace the file"
        raise SourceError("config.json is not valid JSON", where=path, hint=hint) from exc
    except (OSError, ValueError) as exc:  # ValueError: not UTF-8
        hint = getattr(exc, "strerror", None) or str(exc)
        raise SourceError("cannot read config.json", where=path, hint=hint) from exc
    if not isinstance(data, dict):
        hint = f"it holds a JSON {type(data).__name__}; a config.json is a mapping {{...}}"
        raise SourceError("config.json is not a JSON object", where=path, hint=hint)
    return "model_type" in data or "architectures" in data
