"""run(): the numbered steps of a finalize, each agreed on by every rank.

0. base model rank 0: a Hub id --base-model into the Hugging Face cache; every rank reads it there
1. prepare    rank 0: check DEST, build config.json's model on the meta device (the names it expects); then
               every rank: check DEST, find the checkpoint, read its metadata, map names to rank 0's model
   (non-finite scan: with --quantize-skip-nonfinite, each rank checks a share of the weights to quantize)
2. tie check  rank 0 (every rank, on its own files, with --strategy exchange): does lm_head hold exactly
               embed_tokens' data?
3. tokenizer  rank 0: load it, add tokens, apply the chat template; every rank gets the outcome as data
4. plan       every rank: the same pure plan (files, ranks, dtypes, vocabulary resize)
5. stage      rank 0: create the staging dir beside DEST
6. write      every rank: its own files (and its share of a kept optimizer state), into staging
7. finish     rank 0 (commit/finish.py): index, manifest, config, generation config, tokenizer, card, code, into staging
8. commit     every rank agreed that 6 and 7 succeeded: rank 0 renames the staging dir to DEST
               (DistContext.run_commit); after the rename the run reports DEST as complete, whatever happens
9. push       rank 0: upload DEST to the Hub, when asked

A failure before the commit leaves no DEST. The staging dir is removed, unless the failure is one --resume can
get past (a rank died or hung, a signal) and files finished in it: then it is kept, and the error says so.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distfinalize.artifacts.adapter import adapter_config_preview
from distfinalize.artifacts.card import card_preview
from distfinalize.artifacts.code import model_code_files
from distfinalize.artifacts.config import output_config
from distfinalize.artifacts.generation import find_generation_config, generation_config
from distfinalize.artifacts.tokenizer import (
    DEFAULT_PAD,
    FinalTokenizer,
    TokenizerOutcome,
    is_tokenizer_dir,
    parse_token_requests,
    prepare_tokenizer,
    token_requests,
)
from distfinalize.commit.finish import card_info, config_updates, existing_card, finish
from distfinalize.commit.keep import (
    OptimizerCopy,
    checkpoint_dir_name,
    copy_optimizer_files,
    plan_copy,
    share_optimizer_copy,
)
from distfinalize.commit.manifest import MANIFEST
from distfinalize.commit.staging import (
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
from distfinalize.config import FinalizeConfig, format_bytes
from distfinalize.dist.context import CommitOutcome, DistContext
from distfinalize.errors import DistfinalizeError, SourceError
from distfinalize.hfnames import ADAPTER_FILE
from distfinalize.plan import Plan, build_plan, describe, fingerprint
from distfinalize.prepare import basemodel, tie
from distfinalize.prepare.chunks import Checkpoint, plan_parts, read_checkpoint, reading_parts, share_chunks, shared_of
from distfinalize.prepare.model import ModelSpec
from distfinalize.prepare.nonfinite import skip_nonfinite
from distfinalize.prepare.prepared import Prepared, check_destination, input_paths, model_check, prepare
from distfinalize.sources import Source, SourceInfo
from distfinalize.sources.formats import format_of
from distfinalize.sources.locate import Located
from distfinalize.startup import imports_done
from distfinalize.summary import Clock, log_plan, log_summary, progress_mode, rank_figures, summarize, write_report
from distfinalize.transform.quant.selection import embedding_names, quantized_tensors
from distfinalize.transform.vocab import plan_resizes
from distfinalize.write.exchange import describe as describe_exchange
from distfinalize.write.progress import Progress
from distfinalize.write.rank import DataPath, WrittenFile, exchange_schedule, write_rank_files

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What a finalize did or, with --dry-run, would do (rank 0's view)."""

    dest: Path | None  # None for inspect's dry run
    plan: Plan
    info: SourceInfo
    files: tuple[WrittenFile, ...]
    dry_run: bool
    report: dict[str, Any] = field(default_factory=dict)


def run(config: FinalizeConfig, ctx: DistContext) -> Outcome:
    """Finalize config.src into config.dest with every rank of `ctx`. Runs on: all ranks."""
    clock = Clock()
    config = basemodel.resolve(config, ctx, lambda: config.dest and check_destination(config.dest, config.src))
    spec = ctx.run_step("model check", lambda: model_check(config), ranks="rank0")
    given = ctx.run_step("metadata", lambda: read_checkpoint(config), ranks="rank0", share=shared_of)
    checkpoint = Checkpoint(given)  # rank 0 read .metadata; the others hold its tensor table (prepare/chunks.py)
    prepared = ctx.run_step("prepare", lambda: prepare_step(config, ctx.device, spec, checkpoint.open))
    if config.strategy == "exchange":
        share_chunks(ctx, checkpoint, "chunk tables", reading_parts(ctx.world_size))
    prepared = skip_nonfinite(config, prepared, ctx, checkpoint)  # --quantize-skip-nonfinite only
    imports_done()
    tied_head = check_tied(config, prepared, ctx, checkpoint)
    if tied_head is not None:
        prepared = replace(prepared, tensors=tuple(t for t in prepared.tensors if t.name != tied_head), tied=True)
    final = ctx.run_step("tokenizer", lambda: final_tokenizer(config, prepared), ranks="rank0")
    tokenizer = final.outcome
    resizes = plan_resizes(
        prepared.tensors,
        embedding_names(prepared),
        tokenizer.length,
        tokenizer.row_inits,
        config.tokenizer.pad_vocab_multiple,
    )
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
    optimizer = plan_optimizer(config, prepared, ctx)
    report: dict[str, Any] = {}
    if ctx.is_rank0:
        report = dry_run_report(config, prepared, tokenizer, vocab_size, plan) if config.dry_run else {}
        log_plan(plan, prepared, tokenizer, vocab_size)
    if config.dry_run:
        return Outcome(config.dest, plan, prepared.source.info, (), True, report)
    if config.strategy != "exchange":
        share_chunks(ctx, checkpoint, "chunk tables", plan_parts(plan))
    clock.mark("prepare")

    staging = staging_path(config.dest)
    weights_dir = staging / "checkpoints" / checkpoint_dir_name(prepared.source.info.step)
    if not config.keep_checkpoint:
        weights_dir = staging
    locks: list[StagingLock] = []  # rank 0 holds the staging dir's lock until the run ends
    try:
        try:
            ctx.run_step(
                "stage", lambda: stage(config, plan, prepared, weights_dir, optimizer is not None, locks), ranks="rank0"
            )
            with Progress(ctx, plan.total_size, plan.bytes_for(ctx.rank), progress_mode(config.log_level)) as bar:
                share = lambda: write_share(config, ctx, plan, prepared, weights_dir, optimizer, bar)  # noqa: E731
                written = ctx.run_step("write", share, collect="rank0")
                bar.finished()
            files = tuple(f for per_rank, _ in written or () for f in per_rank)  # rank 0's view: every rank's files
            clock.mark("write_step")
            ctx.run_step(
                "finish",
                lambda: finish(
                    config=config,
                    plan=plan,
                    prepared=prepared,
                    tokenizer=final,
                    vocab_size=vocab_size,
                    files=files,
                    staging=staging,
                    weights_dir=weights_dir,
                    optimizer=optimizer,
                ),
                ranks="rank0",
            )
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
    clock.mark("commit")
    report_commit(config, ctx, prepared, plan, done)
    if ctx.rank == done.reporter and written is not None:  # rank 0 holds every rank's figures
        report["summary"] = summarize(config.dest, clock, [figures for _, figures in written], files)
        log_summary(report["summary"])
        if config.report is not None:
            write_report(config.report, report["summary"])
    if config.hub is not None:
        report["hub"] = push_committed(config, ctx)
    return Outcome(config.dest, plan, prepared.source.info, files, False, report)


def prepare_step(
    config: FinalizeConfig, device: torch.device, spec: ModelSpec | None, open_source: Callable[[Located], Source]
) -> Prepared:
    """DEST checked against SRC (cheap, first), the source opened (`open_source`) with rank 0's model `spec`, then
    DEST checked against every input the source named (the checkpoint folder, --checkpoint, --base-model,
    --tokenizer). Runs on: all ranks."""
    if config.dest is not None:
        check_destination(config.dest, config.src)
    prepared = prepare(config, device, spec_of=lambda _: spec, open_source=open_source)
    if config.dest is not None and prepared.folder is not None:
        check_destination(config.dest, config.src, input_paths(config, prepared.folder))
    return prepared


def check_tied(config: FinalizeConfig, prepared: Prepared, ctx: DistContext, checkpoint: Checkpoint) -> str | None:
    """The lm_head name to drop as tied to the embedding (see prepare/tie.py): rank 0 reads both, or with
    `--strategy exchange` every rank compares the chunks of its own files. Runs on: all ranks."""
    pairs = tie.candidates(prepared.tensors, prepared.merges)
    if not pairs:
        return None
    if config.strategy != "exchange":
        return ctx.run_step("tie check", lambda: tie.tied_head(pairs, prepared.source), ranks="rank0")
    source = prepared.source
    files = checkpoint.source.files() if checkpoint.source is not None else None  # every rank's, for the readers
    share = lambda: tie.tie_share(pairs, source.chunks(), source.reader(), ctx.rank, ctx.world_size, files)  # noqa: E731
    return tie.combine(pairs, ctx.run_step("tie check", share, collect="all"))


def final_tokenizer(config: FinalizeConfig, prepared: Prepared) -> FinalTokenizer:
    """Find, extend and template the tokenizer. Runs on: rank 0."""
    options = config.tokenizer
    path = options.path
    if path is not None and not is_tokenizer_dir(path):
        raise SourceError(
            "--tokenizer is not a tokenizer dir",
            where=path,
            hint="expected tokenizer.json or tokenizer_config.json in it",
        )
    if path is None:
        path = next((d for d in prepared.search if is_tokenizer_dir(d)), None)
    default_tokens = options.default_tokens and not prepared.adapter  # an adapter cannot grow the embeddings
    requests = token_requests(DEFAULT_PAD, "the default PAD token") if default_tokens else ()
    if options.add_tokens is not None:
        requests = (*requests, *parse_token_requests(options.add_tokens))
    tokenizer, outcome = prepare_tokenizer(path, requests, options.chat_template)
    return FinalTokenizer(outcome, tokenizer)


def plan_optimizer(config: FinalizeConfig, prepared: Prepared, ctx: DistContext) -> OptimizerCopy | None:
    """This rank's part of the optimizer copy for --keep-optimizer (DCP sources): rank 0 reads the optimizer
    state's metadata and plans the copy, every rank receives the files it copies. Runs on: all ranks."""
    if not config.keep_optimizer:
        return None
    if not format_of(prepared.source).optimizer:
        raise SourceError(
            f"--keep-optimizer supports DCP checkpoints, not {prepared.source.info.format}",
            where=prepared.source.info.path,
            hint="drop --keep-optimizer",
        )
    return share_optimizer_copy(ctx, lambda: plan_copy(prepared.source.info.path))


def stage(
    config: FinalizeConfig,
    plan: Plan,
    prepared: Prepared,
    weights_dir: Path,
    with_optimizer: bool,
    locks: list[StagingLock],
) -> None:
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
    config: FinalizeConfig,
    ctx: DistContext,
    plan: Plan,
    prepared: Prepared,
    weights_dir: Path,
    optimizer: OptimizerCopy | None,
    bar: Progress,
) -> tuple[list[WrittenFile], dict[str, Any]]:
    """This rank's output files, then its share of the optimizer copy; the files and this rank's figures for the
    summary. Runs on: every rank."""
    files = write_rank_files(
        plan,
        ctx,
        prepared.source,
        weights_dir,
        data_path(config),
        progress=bar,
        progress_dir=staging_path(config.dest) / PROGRESS_DIR,
        resume=config.resume,
    )
    if optimizer is not None:
        copied = copy_optimizer_files(optimizer, optimizer.files, weights_dir / "optimizer")
        log.debug("copied %s of optimizer state", format_bytes(copied))
    return files, rank_figures(ctx.rank, bar)


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
        extra = (
            f"--resume will reuse the {finished} kept in {staging}"
            if finished
            else f"remove {staging} (nothing in it is finished), or pass --resume"
        )
        error.hint = f"{error.hint}; {extra}" if error.hint else extra
    elif not isinstance(error, DistfinalizeError) and ctx.is_rank0 and staging.exists():
        log.warning("kept %s: --resume will reuse its %s", staging, finished)
    return error


def report_commit(
    config: FinalizeConfig, ctx: DistContext, prepared: Prepared, plan: Plan, done: CommitOutcome
) -> None:
    """DEST is there: say so once (rank 0, or the lowest surviving rank), with what went wrong around the commit
    without changing that. Runs on: all ranks (one logs)."""
    if ctx.rank != done.reporter:
        return
    log.info(
        "finalized %s -> %s (%d file(s), %s)",
        prepared.source.info.path,
        config.dest,
        len(plan.files),
        format_bytes(plan.total_size),
    )
    for note in done.notes:
        log.warning("%s; DEST is complete: %s (`distfinalize verify %s` checks it)", note, config.dest, config.dest)


def push_committed(config: FinalizeConfig, ctx: DistContext) -> str:
    """The push step, interruptible again; an interruption says DEST is complete. Runs on: all ranks."""
    try:
        with ctx.signals_raise():
            return ctx.run_step("push", lambda: push(config), ranks="rank0")
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
    out: dict[str, Any] = {
        "strategy": config.strategy,
        "read_batch": config.read_batch_bytes,
        "write_threads": config.write_threads,
    }
    if config.strategy == "exchange":
        out["exchange"] = describe_exchange(exchange_schedule(plan, prepared.source, data_path(config)))
    return out
