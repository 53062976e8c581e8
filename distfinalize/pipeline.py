"""run(): the numbered steps of a finalize, each agreed on by every rank.

1. prepare   every rank: find the checkpoint, read its metadata and config.json, map names
2. tie       rank 0: check whether lm_head holds the same data as embed_tokens (when config.json is silent)
3. plan      every rank: the same pure plan
4. stage     rank 0: create the staging dir beside DEST
5. write     every rank: its own files, into staging
6. commit    rank 0: index, config.json, then the atomic rename of staging to DEST
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from distfinalize.architecture import ModelSpec, load_model_spec
from distfinalize.artifacts.config import write_config
from distfinalize.artifacts.index import write_index
from distfinalize.config import FinalizeConfig, format_bytes
from distfinalize.dist import DistContext
from distfinalize.errors import DestinationError
from distfinalize.execute import WrittenFile, write_rank_files
from distfinalize.plan import Plan, build_plan, describe
from distfinalize.sources import Source, SourceInfo, TensorMeta
from distfinalize.sources.locate import find_model_config, locate
from distfinalize.staging import commit, create_staging, remove_staging, staging_path
from distfinalize.transform.keymap import map_names, tie_candidates

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
    tied: bool  # an lm_head identical to embed_tokens was dropped


@dataclass(frozen=True)
class Outcome:
    """What a finalize did (rank 0's view)."""

    dest: Path
    plan: Plan
    info: SourceInfo
    files: tuple[WrittenFile, ...]
    dry_run: bool


def run(config: FinalizeConfig, ctx: DistContext) -> Outcome:
    """Finalize config.src into config.dest with every rank of `ctx`. Runs on: all ranks."""
    prepared = ctx.run_step("prepare", lambda: prepare(config))[ctx.rank]
    tied_pair = ctx.run_step("tie check", lambda: check_tied(prepared), ranks="rank0")[0]
    if tied_pair is not None:
        prepared = replace(prepared, tensors=tuple(t for t in prepared.tensors if t.name != tied_pair), tied=True)
    plan = build_plan(
        prepared.tensors, dtype=prepared.dtype, max_shard_size=config.max_shard_size, world_size=ctx.world_size
    )
    if ctx.is_rank0:
        log_plan(plan, prepared, config)
    if config.dry_run:
        return Outcome(config.dest, plan, prepared.source.info, (), True)
    staging = staging_path(config.dest)
    ctx.run_step("stage", lambda: create_staging(config.dest, config.src), ranks="rank0")
    try:
        written = ctx.run_step(
            "write",
            lambda: write_rank_files(
                plan,
                ctx.rank,
                prepared.source,
                staging,
                ctx.device,
                config.read_batch_bytes,
                progress=ctx.is_rank0 and config.log_level in ("debug", "info"),
            ),
        )
        files = tuple(f for per_rank in written for f in per_rank)
        ctx.run_step("commit", lambda: finish(plan, prepared, files, staging, config.dest), ranks="rank0")
    except BaseException:
        if ctx.is_rank0:
            remove_staging(staging)
        raise
    if ctx.is_rank0:
        log.info(
            "finalized %s -> %s (%d file(s), %s)",
            prepared.source.info.path,
            config.dest,
            len(plan.files),
            format_bytes(plan.total_size),
        )
    return Outcome(config.dest, plan, prepared.source.info, files, False)


def prepare(config: FinalizeConfig) -> Prepared:
    """Locate and open the checkpoint, read config.json, map names, choose the dtype. Runs on: all ranks."""
    check_destination(config.dest, config.src)
    located = locate(config.src, config.checkpoint, config.tag)
    source = located.format.open(located.path, located.step)
    config_path = find_model_config(located.path, config.src)
    spec = load_model_spec(config_path) if config_path is not None else None
    if spec is None:
        log.warning(
            "no config.json found in %s or its parents: tensor names are written as stored and the "
            "output will have no config.json",
            located.path,
        )
    mapped = map_names(source.tensors, spec)
    dtype, reason = choose_dtype(config, spec, mapped.tensors, source.info.training_dtype)
    return Prepared(source, spec, config_path, mapped.tensors, dtype, reason, tied=False)


def check_destination(dest: Path, src: Path) -> None:
    """DEST must not exist and must not lie inside SRC (SRC is only read)."""
    if dest.exists() or dest.is_symlink():
        raise DestinationError(
            "destination already exists", where=dest, hint="choose a new DEST; distfinalize never overwrites"
        )
    if src.exists() and dest.resolve().is_relative_to(src.resolve()):
        raise DestinationError(
            "destination lies inside the source", where=dest, hint="SRC is only ever read; choose a DEST outside it"
        )


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


def check_tied(prepared: Prepared) -> str | None:
    """The lm_head name to drop when it holds exactly embed_tokens' data. Runs on: rank 0 (reads both)."""
    for head, embed in tie_candidates(prepared.tensors):
        data = prepared.source.reader().read([head.key, embed.key])
        if torch.equal(data[head.key], data[embed.key]):
            log.info("%s is identical to %s: writing it once, as tied embeddings", head.name, embed.name)
            return head.name
    return None


def finish(plan: Plan, prepared: Prepared, files: tuple[WrittenFile, ...], staging: Path, dest: Path) -> None:
    """Write the index and config.json, check every planned file is there, then commit. Runs on: rank 0."""
    planned = {f.filename: f for f in plan.files}
    got = {f.filename for f in files}
    if got != planned.keys():
        raise DestinationError(
            "ranks did not write every planned file", where=staging, hint=f"missing: {sorted(planned.keys() - got)[:4]}"
        )
    write_index(plan, staging)
    if prepared.config_path is not None:
        write_config(
            prepared.config_path, staging, prepared.dtype, prepared.tied, prepared.spec and prepared.spec.architecture
        )
    commit(staging, dest)


def log_plan(plan: Plan, prepared: Prepared, config: FinalizeConfig) -> None:
    """Rank 0: what will be done. With --dry-run the whole plan goes to the log as JSON."""
    info = prepared.source.info
    log.info(
        "source: %s checkpoint %s (step %s, saved by %s rank(s)), %d model tensors, %d other entries skipped",
        info.format,
        info.path,
        info.step,
        info.saved_world_size,
        len(prepared.tensors),
        info.skipped,
    )
    log.info(
        "dtype: %s (%s)",
        str(prepared.dtype).removeprefix("torch.") if prepared.dtype else "as stored",
        prepared.dtype_reason,
    )
    log.info("plan: %d file(s), %s, %d rank(s)", len(plan.files), format_bytes(plan.total_size), plan.world_size)
    if config.dry_run:
        log.info("dry run, nothing written. plan:\n%s", json.dumps(describe(plan), indent=2))
