"""run(): the numbered steps of a finalize, each agreed on by every rank.

1. prepare    every rank: find the checkpoint, read its metadata and config.json, map names
2. tie check  rank 0 (every rank, on its own files, with --strategy exchange): does lm_head hold exactly
               embed_tokens' data?
3. tokenizer  rank 0: load it, add tokens, apply the chat template; every rank gets the outcome as data
4. plan       every rank: the same pure plan (files, ranks, dtypes, vocabulary resize)
5. stage      rank 0: create the staging dir beside DEST
6. write      every rank: its own files (and its share of a kept optimizer state), into staging
7. finish     rank 0 (finish.py): index, manifest, config, generation config, tokenizer, card, code, into staging
8. commit     every rank agreed that 6 and 7 succeeded: rank 0 renames the staging dir to DEST
               (DistContext.run_commit); after the rename the run reports DEST as complete, whatever happens
9. push       rank 0: upload DEST to the Hub, when asked

A failure before the commit leaves no DEST. The staging dir is removed, unless the failure is one --resume can
get past (a rank died or hung, a signal) and files finished in it: then it is kept, and the error says so.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from distfinalize import tie
from distfinalize.adapter import (
    LoraLayout,
    adapter_config_preview,
    prepare_lora,
)
from distfinalize.architecture import ModelSpec, load_model_spec
from distfinalize.artifacts import links
from distfinalize.artifacts.card import card_preview
from distfinalize.artifacts.code import model_code_files
from distfinalize.artifacts.config import output_config
from distfinalize.artifacts.generation import find_generation_config, generation_config
from distfinalize.artifacts.tokenizer import (
    DEFAULT_PAD,
    TokenizerOutcome,
    is_tokenizer_dir,
    parse_token_requests,
    prepare_tokenizer,
    token_requests,
)
from distfinalize.config import FinalizeConfig, format_bytes
from distfinalize.dist import CommitOutcome, DistContext
from distfinalize.errors import DestinationError, DistfinalizeError, SourceError, UsageError
from distfinalize.exchange import describe as describe_exchange
from distfinalize.execute import DataPath, WrittenFile, exchange_schedule, write_rank_files
from distfinalize.finish import MANIFEST, card_info, config_updates, existing_card, finish
from distfinalize.keep import (
    OptimizerCopy,
    checkpoint_dir_name,
    copy_optimizer_files,
    optimizer_source,
    plan_optimizer_copy,
)
from distfinalize.logs import log_rank0
from distfinalize.nonfinite import skip_nonfinite
from distfinalize.plan import ADAPTER_FILE, Plan, build_plan, describe, fingerprint
from distfinalize.quantization import embedding_names, quantized_tensors
from distfinalize.sources import Source, SourceInfo, TensorMeta
from distfinalize.sources.locate import find_model_config, locate, search_dirs
from distfinalize.staging import (
    PROGRESS_DIR,
    StagingLock,
    commit,
    create_staging,
    finished_files,
    landed,
    remove_staging,
    source_identity,
    staging_path,
)
from distfinalize.startup import imports_done
from distfinalize.transform.keymap import map_names
from distfinalize.transform.lora import LoraMerge, is_lora_checkpoint
from distfinalize.transform.vocab import plan_resizes

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

    @property
    def adapter(self) -> bool:
        """The output is a PEFT adapter dir (a LoRA checkpoint, no --merge-lora)."""
        return self.lora is not None and not self.lora.merge


@dataclass(frozen=True)
class Outcome:
    """What a finalize did or, with --dry-run, would do (rank 0's view)."""

    dest: Path
    plan: Plan
    info: SourceInfo
    files: tuple[WrittenFile, ...]
    dry_run: bool
    report: dict[str, Any] = field(default_factory=dict)


def run(config: FinalizeConfig, ctx: DistContext) -> Outcome:
    """Finalize config.src into config.dest with every rank of `ctx`. Runs on: all ranks."""
    prepared = ctx.run_step("prepare", lambda: prepare(config, ctx.device))[ctx.rank]
    prepared = skip_nonfinite(config, prepared, ctx)  # --quantize-skip-nonfinite only
    imports_done()
    tied_head = check_tied(config, prepared, ctx)
    if tied_head is not None:
        prepared = replace(prepared, tensors=tuple(t for t in prepared.tensors if t.name != tied_head), tied=True)
    kept_tokenizer: list[Any] = []  # rank 0 keeps the tokenizer object to save it at commit
    tokenizer = ctx.run_step("tokenizer", lambda: final_tokenizer(config, prepared, kept_tokenizer), ranks="rank0")[0]
    resizes = plan_resizes(
        prepared.tensors, embedding_names(prepared), tokenizer.length, tokenizer.row_inits,
        config.tokenizer.pad_vocab_multiple,
    )  # fmt: skip
    plan = build_plan(
        prepared.tensors,
        dtype=prepared.dtype,
        max_shard_size=config.max_shard_size,
        world_size=ctx.world_size,
        resizes=resizes,
        rope_heads=prepared.rope_heads,
        quant=quantized_tensors(config, prepared),
        merges=prepared.merges,
        single_file=ADAPTER_FILE if prepared.adapter else None,
    )
    vocab_size = next(iter(resizes.values())).rows if resizes else None
    optimizer = plan_optimizer(config, prepared)
    report: dict[str, Any] = {}
    if ctx.is_rank0:
        report = dry_run_report(config, prepared, tokenizer, vocab_size, plan) if config.dry_run else {}
        log_plan(plan, prepared, tokenizer, vocab_size)
    if config.dry_run:
        return Outcome(config.dest, plan, prepared.source.info, (), True, report)

    staging = staging_path(config.dest)
    weights_dir = staging / "checkpoints" / checkpoint_dir_name(prepared.source.info.step)
    if not config.keep_checkpoint:
        weights_dir = staging
    locks: list[StagingLock] = []  # rank 0 holds the staging dir's lock until the run ends
    try:
        try:
            ctx.run_step("stage", lambda: stage(config, plan, prepared, weights_dir, optimizer is not None, locks),
                         ranks="rank0")  # fmt: skip
            written = ctx.run_step("write", lambda: write_share(config, ctx, plan, prepared, weights_dir, optimizer))
            files = tuple(f for per_rank in written for f in per_rank)
            ctx.run_step(
                "finish",
                lambda: finish(config, plan, prepared, tokenizer, kept_tokenizer, vocab_size, files, staging,
                               weights_dir, optimizer),
                ranks="rank0",
            )  # fmt: skip
            # the point of no return: raises only when the rename did not happen
            done = ctx.run_commit(lambda: commit(staging, config.dest), lambda: landed(staging, config.dest, MANIFEST))
        except BaseException as exc:
            error = abandon(ctx, staging, exc, owned=bool(locks))
            if error is exc:
                raise
            raise error from exc
    finally:
        for lock in locks:
            lock.release()
    report_commit(config, ctx, prepared, plan, done)
    if config.hub is not None:
        report["hub"] = push_committed(config, ctx)
    return Outcome(config.dest, plan, prepared.source.info, files, False, report)


def prepare(config: FinalizeConfig, device: torch.device | None = None) -> Prepared:
    """Locate and open the checkpoint, read config.json, map names, choose the dtype; refuse a --quantize recipe
    this rank's `device` cannot run. Runs on: all ranks."""
    check_destination(config.dest, config.src)
    check_readable(config.src)
    located = locate(config.src, config.checkpoint, config.tag)
    check_destination(config.dest, config.src, input_paths(config, located.path))
    source = located.format.open(located.path, located.step)
    search = search_dirs(located.path, config.src)
    if config.base_model is not None:
        if not (config.base_model / "config.json").is_file():
            raise SourceError("--base-model has no config.json", where=config.base_model,
                              hint="pass a local Hugging Face model dir")  # fmt: skip
        search.append(config.base_model.resolve())
    config_path = find_model_config(located.path, config.src)
    if config_path is None and config.base_model is not None:
        config_path = config.base_model / "config.json"
    tokenizer_dir = config.tokenizer.path or next((d for d in search if is_tokenizer_dir(d)), None)
    given = links.roots(path for _, path in [("SRC", config.src), *input_paths(config, located.path)])
    links.check_files(links.published_inputs(config_path, search, tokenizer_dir), given)
    spec = load_model_spec(config_path) if config_path is not None else None
    lora = None
    if is_lora_checkpoint(t.name for t in source.tensors):
        if config.key_map is not None:
            raise UsageError("--key-map does not apply to LoRA checkpoints: their names are matched to the PEFT model "
                             "that config.json and the adapter settings describe", where=located.path,
                             hint="drop --key-map")  # fmt: skip
        lora = prepare_lora(config, source, spec, search_dirs(located.path, config.src))
        source = lora.source
    elif config.lora.merge:
        raise SourceError("--merge-lora: the checkpoint holds no LoRA weights (lora_A / lora_B)",
                          where=located.path, hint="drop --merge-lora")  # fmt: skip
    check_strategy(config, source, lora, located.path)
    if lora is not None and not lora.merge:  # the adapter's own tensors, under PEFT's names, as stored or --dtype
        dtype, reason = choose_dtype(config, None, lora.tensors)
        return Prepared(source, spec, config_path, lora.tensors, dtype, reason, tuple(search), lora=lora)
    if spec is None:
        message = "no config.json found in %s or its parents: names are written as stored, with no config.json"
        log_rank0(log, message + " (pass --base-model DIR)", located.path, level=logging.WARNING)
    mapped = map_names(lora.tensors if lora else source.tensors, spec, config.key_map)
    dtype, reason = choose_dtype(config, spec, mapped.tensors, source.info.training_dtype)
    if config.quantize is not None and device is not None:
        from distfinalize.transform.quantize import check_requirement, get_recipe

        check_requirement(get_recipe(config.quantize), device, dtype, where=f"device {device}")
    merges = {t.name: lora.merges[t.key] for t in mapped.tensors if t.key in lora.merges} if lora else {}
    return Prepared(source, spec, config_path, mapped.tensors, dtype, reason, tuple(search), mapped.rope_heads,
                    lora=lora, merges=merges)  # fmt: skip


def check_strategy(config: FinalizeConfig, source: Source, lora: LoraLayout | None, where: Path) -> None:
    """--strategy exchange moves DCP chunks, one source tensor per output tensor: no DeepSpeed, no LoRA merge."""
    if config.strategy != "exchange":
        return
    if lora is not None and lora.merge:
        raise UsageError("--strategy exchange cannot merge LoRA adapters yet (a merged weight needs three tensors)",
                         where=where, hint="use --strategy read (the default) with --merge-lora")  # fmt: skip
    if config.base_model is not None and lora is not None:
        raise UsageError("--strategy exchange cannot move tensors read from --base-model", where=config.base_model,
                         hint="use --strategy read (the default)")  # fmt: skip
    if not hasattr(source, "chunks"):
        raise SourceError(f"--strategy exchange supports DCP checkpoints, not {source.info.format}",
                          where=where, hint="use --strategy read (the default)")  # fmt: skip


def check_readable(src: Path) -> None:
    """SRC (when it exists) must be readable and listable by this process."""
    if src.is_dir() and not os.access(src, os.R_OK | os.X_OK):
        raise SourceError("source is not readable (permission denied)", where=src,
                          hint="run as a user who can read it, or fix its permissions")  # fmt: skip


def check_destination(dest: Path, src: Path, inputs: Sequence[tuple[str, Path | None]] = ()) -> None:
    """DEST must not exist, and neither DEST nor its staging dir may overlap an input: SRC, or any of `inputs`
    ((what, path): the checkpoint folder found, --checkpoint, --base-model, --tokenizer). DEST may not lie inside
    one (it would be written into a tree that is only read) and none may lie inside the staging dir (a failed run
    removes it). Paths are compared resolved, symlinked parents followed. Runs on: all ranks."""
    if dest.exists() or dest.is_symlink():
        raise DestinationError("destination already exists", where=dest,
                               hint="choose a new DEST; distfinalize never overwrites")  # fmt: skip
    target, staging = dest.resolve(), staging_path(dest).resolve()
    for what, path in (("the source", src), *inputs):
        if path is None or not path.exists():
            continue
        real = path.resolve()
        if target.is_relative_to(real) or staging.is_relative_to(real):
            raise DestinationError(f"destination lies inside {what} ({real})", where=dest,
                                   hint="inputs are only ever read; choose a DEST outside them")  # fmt: skip
        if real.is_relative_to(staging):
            raise DestinationError(f"{what} lies inside the destination's staging dir ({staging})", where=path,
                                   hint="a failed run removes that dir; choose another DEST")  # fmt: skip


def input_paths(config: FinalizeConfig, checkpoint_folder: Path) -> list[tuple[str, Path | None]]:
    """The inputs besides SRC that DEST must stay clear of, named as the user knows them. Pure."""
    given = config.checkpoint
    if given is not None and not given.is_absolute() and not given.exists():
        given = config.src / given  # as locate() reads --checkpoint
    return [("the checkpoint folder", checkpoint_folder), ("--checkpoint", given),
            ("--base-model", config.base_model), ("--tokenizer", config.tokenizer.path)]  # fmt: skip


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


def check_tied(config: FinalizeConfig, prepared: Prepared, ctx: DistContext) -> str | None:
    """The lm_head name to drop as tied to the embedding (see tie.py): rank 0 reads both, or with
    `--strategy exchange` every rank compares the chunks of its own files. Runs on: all ranks."""
    pairs = tie.candidates(prepared.tensors, prepared.merges)
    if not pairs:
        return None
    if config.strategy != "exchange":
        return ctx.run_step("tie check", lambda: tie.tied_head(pairs, prepared.source), ranks="rank0")[0]
    source = prepared.source
    shares = ctx.run_step("tie check", lambda: tie.tie_share(pairs, source.chunks(), source.reader(), ctx.rank,
                                                             ctx.world_size))  # fmt: skip
    return tie.combine(pairs, shares)


def final_tokenizer(config: FinalizeConfig, prepared: Prepared, kept: list[Any]) -> TokenizerOutcome:
    """Find, extend and template the tokenizer; keep the object in `kept`. Runs on: rank 0."""
    options = config.tokenizer
    path = options.path
    if path is not None and not is_tokenizer_dir(path):
        raise SourceError("--tokenizer is not a tokenizer dir", where=path,
                          hint="expected tokenizer.json or tokenizer_config.json in it")  # fmt: skip
    if path is None:
        path = next((d for d in prepared.search if is_tokenizer_dir(d)), None)
    default_tokens = options.default_tokens and not prepared.adapter  # an adapter cannot grow the embeddings
    requests = token_requests(DEFAULT_PAD, "the default PAD token") if default_tokens else ()
    if options.add_tokens is not None:
        requests = (*requests, *parse_token_requests(options.add_tokens))
    tokenizer, outcome = prepare_tokenizer(path, requests, options.chat_template)
    kept.append(tokenizer)
    return outcome


def plan_optimizer(config: FinalizeConfig, prepared: Prepared) -> OptimizerCopy | None:
    """The optimizer copy for --keep-optimizer (DCP sources). Pure given the metadata. Runs on: all ranks."""
    if not config.keep_optimizer:
        return None
    metadata = getattr(prepared.source, "metadata", None)
    if prepared.source.info.format != "dcp" or metadata is None:
        raise SourceError(f"--keep-optimizer supports DCP checkpoints, not {prepared.source.info.format}",
                          where=prepared.source.info.path, hint="drop --keep-optimizer")  # fmt: skip
    return plan_optimizer_copy(*optimizer_source(prepared.source.info.path, metadata))


def stage(config: FinalizeConfig, plan: Plan, prepared: Prepared, weights_dir: Path, with_optimizer: bool,
          locks: list[StagingLock]) -> None:  # fmt: skip
    """Create (or, with --resume, take over) the staging dir, locked (the lock goes into `locks`), and the kept
    checkpoint's dirs. The staging dir records the plan and the inputs' identity (names, sizes, mtimes, metadata
    bytes: staging.source_identity) for --resume. Runs on: rank 0."""
    inputs = (prepared.source.info.path, *((config.base_model,) if config.base_model is not None else ()))
    plan_digest = fingerprint(plan, tuple(str(p.resolve()) for p in inputs))
    locks.append(create_staging(config.dest, plan_digest, source_identity(inputs), config.resume))
    weights_dir.mkdir(parents=True, exist_ok=True)
    if with_optimizer:
        (weights_dir / "optimizer").mkdir(exist_ok=True)


def write_share(
    config: FinalizeConfig, ctx: DistContext, plan: Plan, prepared: Prepared, weights_dir: Path,
    optimizer: OptimizerCopy | None,
) -> list[WrittenFile]:  # fmt: skip
    """This rank's output files, then its share of the optimizer copy. Runs on: every rank."""
    files = write_rank_files(
        plan, ctx, prepared.source, weights_dir, data_path(config),
        progress=ctx.is_rank0 and config.log_level in ("debug", "info"),
        progress_dir=staging_path(config.dest) / PROGRESS_DIR, resume=config.resume,
    )  # fmt: skip
    if optimizer is not None:
        copied = copy_optimizer_files(optimizer, optimizer.files_for(ctx.rank, ctx.world_size),
                                      weights_dir / "optimizer")  # fmt: skip
        log.debug("copied %s of optimizer state", format_bytes(copied))
    return files


def abandon(ctx: DistContext, staging: Path, exc: BaseException, owned: bool) -> BaseException:
    """The error to raise for a failure before the commit (a signal becomes one, see DistContext.interruption).

    Rank 0, when the staging dir is its own (`owned`), removes it unless the failure is one --resume can get past
    (`keeps_staging`) and files finished in it; the reporting rank's hint says how many --resume will reuse.
    Runs on: all ranks.
    """
    error = ctx.interruption(exc, "nothing was written to DEST") if isinstance(exc, KeyboardInterrupt) else exc
    keep = getattr(error, "keeps_staging", False)
    finished = finished_files(staging)
    if ctx.is_rank0 and owned and not (keep and finished):
        remove_staging(staging)
    if isinstance(error, DistfinalizeError) and keep and (owned or not ctx.is_rank0) and staging.exists():
        extra = (f"--resume will reuse the {finished} finished file(s) kept in {staging}" if finished else
                 f"remove {staging} (nothing in it is finished), or pass --resume")  # fmt: skip
        error.hint = f"{error.hint}; {extra}" if error.hint else extra
    elif not isinstance(error, DistfinalizeError) and ctx.is_rank0 and staging.exists():
        log.warning("kept %s: --resume will reuse its %d finished file(s)", staging, finished)
    return error


def report_commit(config: FinalizeConfig, ctx: DistContext, prepared: Prepared, plan: Plan,
                  done: CommitOutcome) -> None:  # fmt: skip
    """DEST is there: say so once (rank 0, or the lowest surviving rank), with what went wrong around the commit
    without changing that. Runs on: all ranks (one logs)."""
    if ctx.rank != done.reporter:
        return
    log.info("finalized %s -> %s (%d file(s), %s)", prepared.source.info.path, config.dest, len(plan.files),
             format_bytes(plan.total_size))  # fmt: skip
    for note in done.notes:
        log.warning("%s; DEST is complete: %s (`distfinalize verify %s` checks it)", note, config.dest, config.dest)


def push_committed(config: FinalizeConfig, ctx: DistContext) -> str:
    """The push step, interruptible again; an interruption says DEST is complete. Runs on: all ranks."""
    try:
        with ctx.signals_raise():
            return ctx.run_step("push", lambda: push(config), ranks="rank0")[0]
    except KeyboardInterrupt as exc:
        raise ctx.interruption(exc, f"DEST is complete ({config.dest}) but was not pushed to the Hub") from None


def push(config: FinalizeConfig) -> str:
    """Upload DEST to the Hub. Runs on: rank 0, after the commit."""
    from distfinalize.artifacts.hub import push_to_hub

    url = push_to_hub(config.dest, config.hub)
    log.info("pushed %s to %s", config.dest, url)
    return url


def dry_run_report(
    config: FinalizeConfig, prepared: Prepared, tokenizer: TokenizerOutcome, vocab_size: int | None, plan: Plan
) -> dict[str, Any]:
    """Everything a finalize would write, as data. Runs on: rank 0."""
    report: dict[str, Any] = {"plan": describe(plan), "data_path": describe_data_path(config, prepared, plan)}
    if prepared.lora is not None:
        report["lora"] = prepared.lora.summary()
    if prepared.adapter:
        report["adapter_config.json"] = adapter_config_preview(prepared.lora)
    elif prepared.config_path is not None:
        updates = config_updates(config, prepared, tokenizer, vocab_size)
        report["config.json"] = output_config(prepared.config_path, updates)
        report["generation_config.json"] = generation_config(
            find_generation_config(prepared.config_path), tokenizer, report["config.json"], config.generation
        )
        report["model_code"] = [p.name for p in model_code_files(prepared.config_path.parent)]
    report["tokenizer"] = {
        "from": str(tokenizer.path) if tokenizer.path else None,
        "added": [list(a) for a in tokenizer.added],
        "chat_template": tokenizer.has_chat_template,
    }
    report["model_card"] = card_preview(card_info(config, prepared), existing_card(prepared))
    if config.keep_checkpoint:
        report["kept_checkpoint"] = f"checkpoints/{checkpoint_dir_name(prepared.source.info.step)}"
    if config.hub is not None:
        from distfinalize.artifacts.hub import hub_preview

        report["hub"] = hub_preview(config.dest, config.hub)
    return json.loads(json.dumps(report, default=str))


def data_path(config: FinalizeConfig) -> DataPath:
    return DataPath(config.strategy, config.read_batch_bytes, config.write_threads)


def describe_data_path(config: FinalizeConfig, prepared: Prepared, plan: Plan) -> dict[str, Any]:
    """--strategy, --read-batch, --write-threads, and for exchange the rounds it would take. Pure."""
    out: dict[str, Any] = {"strategy": config.strategy, "read_batch": config.read_batch_bytes,
                           "write_threads": config.write_threads}  # fmt: skip
    if config.strategy == "exchange":
        out["exchange"] = describe_exchange(exchange_schedule(plan, prepared.source, data_path(config)))
    return out


def log_plan(plan: Plan, prepared: Prepared, tokenizer: TokenizerOutcome, vocab_size: int | None) -> None:
    """Rank 0: what will be done."""
    info = prepared.source.info
    log.info("source: %s checkpoint %s (step %s, saved by %s rank(s)), %d model tensors, %d other entries skipped",
             info.format, info.path, info.step, info.saved_world_size, len(prepared.tensors), info.skipped)  # fmt: skip
    log.info("dtype: %s (%s)", str(prepared.dtype).removeprefix("torch.") if prepared.dtype else "as stored",
             prepared.dtype_reason)  # fmt: skip
    if vocab_size is not None:
        log.info("vocabulary: embedding rows -> %d (%d token(s) added)", vocab_size, len(tokenizer.added))
    if prepared.lora is not None:
        lora = prepared.lora.summary()
        log.info("LoRA checkpoint (r=%s, alpha=%s, targets %s; settings from %s): writing %s", lora["r"],
                 lora["lora_alpha"], lora["target_modules"], lora["config_from"],
                 "the merged model" if prepared.lora.merge else "a PEFT adapter dir")  # fmt: skip
    log.info("plan: %d file(s), %s, %d rank(s)", len(plan.files), format_bytes(plan.total_size), plan.world_size)
