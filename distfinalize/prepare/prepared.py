"""Prepared and prepare(): the checkpoint opened, config.json read, names mapped, the dtype chosen; identical on
every rank.

Runs on: all ranks.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from distfinalize.artifacts import links
from distfinalize.artifacts.tokenizer import (
    is_tokenizer_dir,
)
from distfinalize.commit.staging import (
    staging_path,
)
from distfinalize.config import FinalizeConfig
from distfinalize.errors import DestinationError, SourceError, UsageError
from distfinalize.logs import log_rank0
from distfinalize.prepare.basemodel import base_model_hint, snapshot_repo
from distfinalize.prepare.model import ModelSpec, cached_model_spec, load_model_spec
from distfinalize.prepare.peft import (
    LoraLayout,
    prepare_lora,
)
from distfinalize.sources import Source, TensorMeta
from distfinalize.sources.formats import format_of
from distfinalize.sources.locate import Located, find_model_config, locate, search_dirs
from distfinalize.transform.keymap import map_names
from distfinalize.transform.lora import LoraMerge, is_lora_checkpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """Everything the plan is made from. Identical on every rank."""

    source: Source
    spec: ModelSpec | None
    config_path: Path | None
    tensors: tuple[TensorMeta, ...]
    dtype: torch.dtype | None
    dtype_reason: str
    search: tuple[Path, ...]  # dirs where tokenizer, generation config, card and code are looked for
    rope_heads: Mapping[str, int] = field(default_factory=dict)  # from the key map (torchtitan layouts)
    tied: bool = False  # an lm_head identical to embed_tokens was dropped
    lora: LoraLayout | None = None  # a LoRA checkpoint
    merges: Mapping[str, LoraMerge] = field(default_factory=dict)  # --merge-lora, by output name
    nonfinite: frozenset[str] = frozenset()  # weights holding NaN/Inf that --quantize leaves (nonfinite.py)
    folder: Path | None = None  # the checkpoint folder that was located (DEST must stay out of it)

    @property
    def adapter(self) -> bool:
        """The output is a PEFT adapter dir (a LoRA checkpoint, no --merge-lora)."""
        return self.lora is not None and not self.lora.merge


def model_check(config: FinalizeConfig) -> ModelSpec | None:
    """DEST checked against SRC (cheap, first), then the model config.json describes, instantiated on the meta
    device (None without a config.json). Runs on: rank 0 (the pipeline's first step: the other ranks take its
    result instead of importing transformers)."""
    if config.dest is not None:
        check_destination(config.dest, config.src)
    return _config_spec(_open_inputs(config)[2], cached_model_spec)


def prepare(
    config: FinalizeConfig,
    device: torch.device | None = None,
    *,
    spec_of: Callable[[Path], ModelSpec | None] = load_model_spec,
    open_source: Callable[[Located], Source] | None = None,
) -> Prepared:
    """Locate and open the checkpoint, read config.json, map names, choose the dtype; refuse a --quantize recipe
    this rank's `device` cannot run. `spec_of` gives config.json's ModelSpec (the pipeline passes the one rank 0
    made); `open_source` opens the located checkpoint (the pipeline's reuses the metadata rank 0 read, see
    chunks.py). Runs on: all ranks."""
    located, search, config_path = _open_inputs(config)
    source = open_source(located) if open_source else located.format.open(located.path, located.step)
    spec = _config_spec(config_path, spec_of)
    lora = None
    if is_lora_checkpoint(t.name for t in source.tensors):
        if config.key_map is not None:
            raise UsageError(
                "--key-map does not apply to LoRA checkpoints: their names are matched to the PEFT model "
                "that config.json and the adapter settings describe",
                where=located.path,
                hint="drop --key-map",
            )
        lora = prepare_lora(config, source, spec, search_dirs(located.path, config.src))
        source = lora.source
    elif config.lora.merge:
        raise SourceError(
            "--merge-lora: the checkpoint holds no LoRA weights (lora_A / lora_B)",
            where=located.path,
            hint="drop --merge-lora",
        )
    check_strategy(config, source, lora, located.path)
    if lora is not None and not lora.merge:  # the adapter's own tensors, under PEFT's names, as stored or --dtype
        dtype, reason = choose_dtype(config, None, lora.tensors)
        return Prepared(
            source, spec, config_path, lora.tensors, dtype, reason, tuple(search), lora=lora, folder=located.path
        )
    if spec is None:
        check_tensors_only(config, located.path)
    mapped = map_names(lora.tensors if lora else source.tensors, spec, config.key_map)
    dtype, reason = choose_dtype(config, spec, mapped.tensors, source.info.training_dtype)
    if config.quantize is not None and device is not None:
        from distfinalize.transform.quant.recipes import get_recipe
        from distfinalize.transform.quant.selection import check_requirement

        check_requirement(get_recipe(config.quantize), device, dtype, where=f"device {device}")
    merges = {t.name: lora.merges[t.key] for t in mapped.tensors if t.key in lora.merges} if lora else {}
    return Prepared(
        source,
        spec,
        config_path,
        mapped.tensors,
        dtype,
        reason,
        tuple(search),
        mapped.rope_heads,
        lora=lora,
        merges=merges,
        folder=located.path,
    )


def check_tensors_only(config: FinalizeConfig, folder: Path) -> None:
    """No config.json anywhere: a model dir transformers cannot load is written only with --tensors-only (and
    inspect / verify, which write nothing, just say so)."""
    if config.tensors_only or config.dest is None:
        message = "no config.json found for %s: names are written as stored, with no config.json"
        log_rank0(log, message, folder, level=logging.WARNING)
        return
    raise SourceError(
        "no config.json found (looked in the checkpoint folder, its parents up to SRC and two levels above)",
        where=folder,
        hint=(
            base_model_hint(search_dirs(folder, config.src))
            or "pass --base-model DIR|HUB_ID, the model the run started from"
        )
        + " (its config.json, tokenizer and generation config are used), or --tensors-only to write the tensors "
        "as stored, without a config.json (transformers cannot load that dir)",
    )


def _open_inputs(config: FinalizeConfig) -> tuple[Located, list[Path], Path | None]:
    """The checkpoint located, the dirs searched for its companions, and config.json's path, every published
    input checked to stay inside the trees given. Runs on: all ranks (rank 0 first, in the model check)."""
    check_readable(config.src)
    located = locate(config.src, config.checkpoint, config.tag)
    search = search_dirs(located.path, config.src)
    if config.base_model is not None:
        if not (config.base_model / "config.json").is_file():
            raise SourceError(
                "--base-model has no config.json",
                where=config.base_model,
                hint="pass a Hugging Face model dir (with config.json) or a Hub id",
            )
        search.append(config.base_model.resolve())
    config_path = find_model_config(located.path, config.src)
    if config_path is None and config.base_model is not None:
        config_path = config.base_model / "config.json"
    tokenizer_dir = config.tokenizer.path or next((d for d in search if is_tokenizer_dir(d)), None)
    inputs = [("SRC", config.src), *input_paths(config, located.path), ("", snapshot_repo(config.base_model))]
    given = links.roots(path for _, path in inputs)  # a Hub cache snapshot links into its repo's blobs/
    links.check_files(links.published_inputs(config_path, search, tokenizer_dir), given)
    return located, search, config_path


def _config_spec(config_path: Path | None, spec_of: Callable[[Path], ModelSpec | None]) -> ModelSpec | None:
    return spec_of(config_path) if config_path is not None else None


def check_strategy(config: FinalizeConfig, source: Source, lora: LoraLayout | None, where: Path) -> None:
    """--strategy exchange moves DCP chunks, one source tensor per output tensor: no DeepSpeed, no LoRA merge."""
    if config.strategy != "exchange":
        return
    if lora is not None and lora.merge:
        raise UsageError(
            "--strategy exchange cannot merge LoRA adapters yet (a merged weight needs three tensors)",
            where=where,
            hint="use --strategy read (the default) with --merge-lora",
        )
    if config.base_model is not None and lora is not None:
        raise UsageError(
            "--strategy exchange cannot move tensors read from --base-model",
            where=config.base_model,
            hint="use --strategy read (the default)",
        )
    if not format_of(source).chunked:
        raise SourceError(
            f"--strategy exchange supports DCP checkpoints, not {source.info.format}",
            where=where,
            hint="use --strategy read (the default)",
        )


def check_readable(src: Path) -> None:
    """SRC (when it exists) must be readable and listable by this process."""
    if src.is_dir() and not os.access(src, os.R_OK | os.X_OK):
        raise SourceError(
            "source is not readable (permission denied)",
            where=src,
            hint="run as a user who can read it, or fix its permissions",
        )


def check_destination(dest: Path, src: Path, inputs: Sequence[tuple[str, Path | None]] = ()) -> None:
    """DEST must not exist, and neither DEST nor its staging dir may overlap an input: SRC, or any of `inputs`
    ((what, path): the checkpoint folder found, --checkpoint, --base-model, --tokenizer). DEST may not lie inside
    one (it would be written into a tree that is only read) and none may lie inside the staging dir (a failed run
    removes it). Paths are compared resolved, symlinked parents followed. Runs on: all ranks."""
    if dest.exists() or dest.is_symlink():
        raise DestinationError(
            "destination already exists", where=dest, hint="choose a new DEST; distfinalize never overwrites"
        )
    target, staging = dest.resolve(), staging_path(dest).resolve()
    for what, path in (("the source", src), *inputs):
        if path is None or not path.exists():
            continue
        real = path.resolve()
        if target.is_relative_to(real) or staging.is_relative_to(real):
            raise DestinationError(
                f"destination lies inside {what} ({real})",
                where=dest,
                hint="inputs are only ever read; choose a DEST outside them",
            )
        if real.is_relative_to(staging):
            raise DestinationError(
                f"{what} lies inside the destination's staging dir ({staging})",
                where=path,
                hint="a failed run removes that dir; choose another DEST",
            )


def input_paths(config: FinalizeConfig, checkpoint_folder: Path) -> list[tuple[str, Path | None]]:
    """The inputs besides SRC that DEST must stay clear of, named as the user knows them. Pure."""
    given = config.checkpoint
    if given is not None and not given.is_absolute() and not given.exists():
        given = config.src / given  # as locate() reads --checkpoint
    return [
        ("the checkpoint folder", checkpoint_folder),
        ("--checkpoint", given),
        ("--base-model", config.base_model),
        ("--tokenizer", config.tokenizer.path),
    ]


def choose_dtype(
    config: FinalizeConfig,
    spec: ModelSpec | None,
    tensors: tuple[TensorMeta, ...],
    training_dtype: torch.dtype | None = None,
) -> tuple[torch.dtype | None, str]:
    """--dtype, else config.json's dtype, else the training dtype the checkpoint records, else as stored."""
    if config.torch_dtype is not None:
        return config.torch_dtype, "--dtype"
    if spec is not None and spec.config_dtype is not None:
        dtype = getattr(torch, spec.config_dtype, None)
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            return dtype, f"dtype in {spec.config_path}"
    if training_dtype is not None:
        return training_dtype, "the training dtype recorded in the checkpoint"
    stored = {t.dtype for t in tensors if t.dtype.is_floating_point}
    if len(stored) == 1:
        return stored.pop(), "as stored in the checkpoint"
    return None, "as stored in the checkpoint (mixed dtypes)"
