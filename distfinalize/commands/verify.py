"""`distfinalize verify DEST [--source SRC]`: check a finalized model directory, with every rank of the job.

    python -m distfinalize verify DEST [--source SRC] [--json]
    torchrun --nproc_per_node=N -m distfinalize verify DEST --source SRC

One row per check, each pass, fail or skip; the exit code is 1 when any check failed:

  manifest                 distfinalize-manifest.json is there and well formed. Its absence is a failure: the
                           checksums cannot be checked (the other checks still run).
  safetensors headers      every weight file's header parses, with safetensors itself and with a strict reading
                           (no name twice, data offsets contiguous and covering the file, sizes matching shapes)
  index                    model.safetensors.index.json names every tensor exactly once, in the file that holds
                           it, names only files that exist, and its metadata.total_size is the sum of the tensor
                           bytes; without an index, model.safetensors is the one weight file
  checksums                every weight file's size and sha256 match the manifest (for a file several ranks
                           wrote, the sha256 of each byte range the manifest records, computed in the same
                           read), and the manifest lists no file that is not there (with --keep-checkpoint the
                           root's symlinks are followed)
  dtype                    every floating tensor has the dtype DEST declares: --dtype, else the manifest's, else
                           config.json's (which must agree with the manifest's); the tensors of quantized weights
                           have the dtypes of the recipe the manifest records
  source tensors           with --source: every output tensor equals, bit for bit, the source tensor put through
                           finalize's own transforms (cast to that dtype, key-map permutations); an embedding grown
                           for new tokens on its first rows; a quantized weight (the recipe and --quantize-ignore
                           patterns come from the manifest) has the recipe's tensors, which dequantize to within
                           the recipe's round-to-nearest bound of the source, element by element; a LoRA output
                           (the manifest's "lora" record) is redone: adapter tensors bit-exact, merged weights
                           within float32 matmul rounding plus one rounding to the dtype. Every source tensor is
                           in DEST (an lm_head dropped as tied to the embedding must equal it)
  config.json              loads with transformers.AutoConfig (a failure when absent; for a PEFT adapter dir,
                           adapter_config.json loads with peft's LoraConfig instead)
  tokenizer                loads with AutoTokenizer, with no more tokens than vocab_size (skip: no tokenizer files)
  generation_config.json   loads with GenerationConfig (skip when absent)

The source is opened like finalize opens it (pipeline.prepare): the checkpoint the manifest records when it lies
in SRC (else the latest, or --checkpoint / --tag), names mapped through its config.json (else DEST's).

Work is split over the ranks: each weight file goes to one rank (balanced by bytes); a rank parses, hashes and
compares only its files, reading only the source bytes of their tensors. One gather brings every rank's findings
to every rank; rank 0 also loads the configs and the tokenizer, and prints the table.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from distfinalize.commands.arguments import verify_args
from distfinalize.commands.checks import (
    FAIL,
    PASS,
    SKIP,
    Check,
    FileFindings,
    Options,
    RankFindings,
    SourceSummary,
    as_json,
    check_artifacts,
    declared_dtype,
    evaluate,
    tied_in_output,
)
from distfinalize.commands.compare import (
    READ_BATCH_BYTES,
    Expectation,
    FileComparison,
    compare_file,
    expectations,
    open_source,
    recorded_checkpoint,
)
from distfinalize.commands.hfdir import HeaderError, Survey, WeightFile, read_header, survey
from distfinalize.errors import DistfinalizeError
from distfinalize.plan import assign_ranks
from distfinalize.write.writer import range_digests

if TYPE_CHECKING:
    from distfinalize.dist.context import DistContext

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ data


# ------------------------------------------------------------------------------------------------ DEST


# ------------------------------------------------------------------------------------------------ a rank's share


def verify_share(options: Options, found: Survey, rank: int, world_size: int) -> RankFindings:
    """Check this rank's weight files (and, on rank 0, the configs and tokenizer). Runs on: every rank."""
    ranks = assign_ranks([f.size for f in found.files], world_size)
    mine = [f for f, r in zip(found.files, ranks, strict=True) if r == rank]
    summary, wanted, reader = None, None, None
    if options.source is not None:
        summary, wanted, reader = _source_for(options, found)
    findings = []
    bar = tqdm(
        total=sum(f.size for f in mine),
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=f"rank {rank} verifying",
        disable=not (options.progress and mine and rank == 0),
        mininterval=1.0,
    )
    with bar:
        for weight in mine:
            findings.append(check_file(weight, rank, wanted, reader, piece_bounds(found, weight)))
            bar.update(weight.size)
    artifacts = check_artifacts(found) if rank == 0 else ()
    return RankFindings(rank, tuple(findings), summary, artifacts)


def _source_for(options: Options, found: Survey) -> tuple[SourceSummary, dict | None, Any]:
    """Open the source and work out what each output tensor must be. Runs on: every rank."""
    dtype, _ = declared_dtype(found, options.dtype)
    try:
        prepared, quant = open_source(options.source, found, options.checkpoint, options.tag, options.log_level)
        if dtype is None:
            dtype = prepared.dtype
        wanted, absent = expectations(prepared, dtype, tied_in_output(found), quant)
        reader = prepared.source.reader()
    except DistfinalizeError as exc:
        return SourceSummary(error=str(exc)), None, None
    info = prepared.source.info
    step = f", step {info.step}" if info.step is not None else ""
    description = f"{info.format} checkpoint {info.path}{step}"
    recorded = recorded_checkpoint(found.manifest, options.source)
    if recorded is not None and recorded.resolve() != info.path.resolve():
        description += f" (DEST's manifest says it was made from {recorded})"
    outputs = tuple(o for want in wanted.values() for o in want.plan.outputs)
    return SourceSummary(description, outputs, absent, merged=len(prepared.merges)), wanted, reader


def piece_bounds(found: Survey, weight: WeightFile) -> list[int]:
    """The offsets between the byte ranges the manifest records a digest of, for a file several ranks wrote (from
    0 to its size); none for a file with one sha256. Pure."""
    entry = ((found.manifest or {}).get("files") or {}).get(weight.manifest_key)
    if not isinstance(entry, dict) or "pieces" not in entry:
        return []
    return [0, *(stop for _, stop, _ in entry["pieces"])]


def check_file(
    weight: WeightFile,
    rank: int,
    wanted: Mapping[str, Expectation] | None,
    reader: Any,
    bounds: Sequence[int] = (),
) -> FileFindings:
    """Header, sha256 (and of each byte range between `bounds`, in the same pass) and (with a source) tensors of
    one weight file. Runs on: the rank that owns it."""
    try:
        header = read_header(weight.path)
    except HeaderError as exc:
        header, header_error = None, str(exc)
    else:
        header_error = None
    pieces: list[str] = []
    try:
        digest, pieces = range_digests(weight.path, bounds)
    except OSError as exc:
        digest = None
        header_error = header_error or f"cannot read: {exc.strerror or exc}"
    comparison = FileComparison()
    if header is not None and wanted is not None:
        try:
            comparison = compare_file(weight, header, wanted, reader, READ_BATCH_BYTES)
        except DistfinalizeError as exc:
            comparison = FileComparison(problems=(f"{weight.name}: cannot read the source ({exc})",))
    log.debug(
        "%s: header %s, %d tensor(s) compared, %d problem(s)",
        weight.name,
        header_error or "ok",
        comparison.compared,
        len(comparison.problems),
    )
    return FileFindings(weight.name, rank, weight.size, digest, header, header_error, comparison, tuple(pieces))


# ------------------------------------------------------------------------------------------------ the verdict


# ------------------------------------------------------------------------------------------------ output


def format_table(checks: Sequence[Check], title: str) -> str:
    """The pass/fail table and a one-line verdict."""
    width = max(len(c.name) for c in checks)
    lines = [title, f"{'check':<{width}}  status  detail"]
    lines += [f"{c.name:<{width}}  {c.status:<6}  {c.detail}" for c in checks]
    lines.append(verdict(checks))
    return "\n".join(lines)


def verdict(checks: Sequence[Check]) -> str:
    failed = [c.name for c in checks if c.status == FAIL]
    counts = {s: sum(c.status == s for c in checks) for s in (PASS, FAIL, SKIP)}
    if failed:
        return f"verify: FAILED ({len(failed)} of {len(checks)} checks failed: {', '.join(failed)})"
    return f"verify: passed ({counts[PASS]} passed, {counts[SKIP]} skipped)"


def parse_options(argv: Sequence[str]) -> Options:
    args = verify_args(argv)
    return Options(
        args.dest,
        args.source,
        args.checkpoint,
        args.tag,
        args.dtype,
        args.log_level,
        args.json,
        args.timeout,
        progress=args.log_level in ("debug", "info") and not args.json,
    )


def main(argv: Sequence[str]) -> int:
    """`distfinalize verify ...`: returns 0 when every check passed or was skipped, 1 otherwise.

    Runs on: all ranks; rank 0 prints.
    """
    from distfinalize.commands.runner import emit, run_guarded

    options = parse_options(argv)

    def job(ctx: DistContext) -> int:
        surveyed: list[Survey] = []

        def share() -> RankFindings:
            surveyed.append(survey(options.dest))
            return verify_share(options, surveyed[0], ctx.rank, ctx.world_size)

        shares = ctx.run_step("verify", share, collect="all")  # the one gather: every rank's findings, on every rank
        found = surveyed[0]
        checks = evaluate(found, shares, options)
        if ctx.is_rank0:
            if options.as_json:
                emit(json.dumps(as_json(found, checks, shares, options), indent=2))
            else:
                source = f" against {options.source}" if options.source is not None else ""
                title = f"distfinalize verify {options.dest}{source} ({ctx.world_size} rank(s))"
                emit(format_table(checks, title))
        return 1 if any(c.status == FAIL for c in checks) else 0

    return run_guarded(job, log_level=options.log_level, device="cpu", timeout_s=options.timeout_s)
