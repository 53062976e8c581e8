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
  checksums                every weight file's size and sha256 match the manifest, and the manifest lists no
                           file that is not there (with --keep-checkpoint the root's symlinks are followed)
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

Work is split like finalize's: each weight file goes to one rank (balanced by bytes); a rank parses, hashes and
compares only its files, reading only the source bytes of their tensors. One gather brings every rank's findings
to every rank; rank 0 also loads the configs and the tokenizer, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from distfinalize.artifacts.tokenizer import is_tokenizer_dir
from distfinalize.cli import add_timeout_option
from distfinalize.commands.compare import (
    READ_BATCH_BYTES,
    Expectation,
    FileComparison,
    compare_file,
    expectations,
    open_source,
    recorded_checkpoint,
    recorded_quantization,
)
from distfinalize.commands.hfdir import Header, HeaderError, Survey, WeightFile, config_dtype, read_header, survey
from distfinalize.config import DTYPES, LOG_LEVELS
from distfinalize.errors import DistfinalizeError
from distfinalize.finish import MANIFEST
from distfinalize.plan import ADAPTER_CONFIG, INDEX_FILE, assign_ranks
from distfinalize.transform.quantize import get_recipe
from distfinalize.write import SAFETENSORS_DTYPES, file_sha256

if TYPE_CHECKING:
    from distfinalize.dist import DistContext

log = logging.getLogger(__name__)

PASS, FAIL, SKIP = "pass", "fail", "skip"
MAX_DETAILS = 4  # problems named in a row's detail; the rest are counted
TORCH_DTYPES = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}


# ------------------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class Check:
    """One row of the table."""

    name: str
    status: str
    detail: str


@dataclass(frozen=True)
class SourceSummary:
    """The source as a rank opened it (or why it could not)."""

    description: str = ""
    names: tuple[str, ...] = ()  # every output tensor finalize makes from it (a quantized weight: several)
    may_be_absent: tuple[str, ...] = ()  # heads finalize may have dropped as tied
    error: str | None = None
    merged: int = 0  # weights with a LoRA adapter merged in: compared within rounding, not bit for bit


@dataclass(frozen=True)
class FileFindings:
    """What the rank that owns a weight file found in it."""

    name: str
    rank: int
    size: int
    sha256: str | None = None
    header: Header | None = None
    header_error: str | None = None
    comparison: FileComparison = field(default_factory=FileComparison)  # with --source; else nothing compared


@dataclass(frozen=True)
class RankFindings:
    """One rank's share, gathered to every rank."""

    rank: int
    files: tuple[FileFindings, ...]
    source: SourceSummary | None
    artifacts: tuple[Check, ...] = ()  # rank 0: config.json, tokenizer, generation config


@dataclass(frozen=True)
class Options:
    dest: Path
    source: Path | None = None
    checkpoint: Path | None = None
    tag: str | None = None
    dtype: str | None = None
    log_level: str = "info"
    as_json: bool = False
    timeout_s: float = 1800.0
    progress: bool = field(default=False, compare=False)


# ------------------------------------------------------------------------------------------------ DEST


def declared_dtype(found: Survey, override: str | None) -> tuple[torch.dtype | None, str]:
    """The dtype DEST says its floating tensors have, and who says so."""
    if override is not None:
        return DTYPES[override], "--dtype"
    if found.manifest is not None and found.manifest.get("dtype") in DTYPES:
        return DTYPES[found.manifest["dtype"]], MANIFEST
    from_config = config_dtype(found.config)
    if from_config is not None:
        return DTYPES[from_config], "config.json"
    return None, "nothing"


def tied_in_output(found: Survey) -> bool:
    return bool(found.config and found.config.get("tie_word_embeddings"))


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
            findings.append(check_file(weight, rank, wanted, reader))
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


def check_file(weight: WeightFile, rank: int, wanted: Mapping[str, Expectation] | None, reader: Any) -> FileFindings:
    """Header, sha256 and (with a source) tensors of one weight file. Runs on: the rank that owns it."""
    try:
        header = read_header(weight.path)
    except HeaderError as exc:
        header, header_error = None, str(exc)
    else:
        header_error = None
    try:
        digest = file_sha256(weight.path)
    except OSError as exc:
        digest = None
        header_error = header_error or f"cannot read: {exc.strerror or exc}"
    comparison = FileComparison()
    if header is not None and wanted is not None:
        try:
            comparison = compare_file(weight, header, wanted, reader, READ_BATCH_BYTES)
        except DistfinalizeError as exc:
            comparison = FileComparison(problems=(f"{weight.name}: cannot read the source ({exc})",))
    log.debug("%s: header %s, %d tensor(s) compared, %d problem(s)", weight.name, header_error or "ok",
              comparison.compared, len(comparison.problems))  # fmt: skip
    return FileFindings(weight.name, rank, weight.size, digest, header, header_error, comparison)


def check_artifacts(found: Survey) -> tuple[Check, ...]:
    """config.json, the tokenizer and generation_config.json, loaded with transformers. Runs on: rank 0."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config_check, vocab_size = _check_config(found.dest)
        return config_check, _check_tokenizer(found.dest, vocab_size), _check_generation(found.dest)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _check_config(dest: Path) -> tuple[Check, int | None]:
    name = "config.json"
    if not (dest / name).is_file() and (dest / ADAPTER_CONFIG).is_file():
        return _check_adapter_config(dest), None
    if not (dest / name).is_file():
        return Check(name, FAIL, "absent: transformers cannot load the model without it (finalize with "
                                 "--base-model DIR)"), None  # fmt: skip
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(dest))
    except Exception as exc:  # transformers raises many kinds; each is a failed check, not a crash
        return Check(name, FAIL, f"AutoConfig cannot load it ({_first_line(exc)})"), None
    vocab = getattr(config, "vocab_size", None)
    if vocab is None and hasattr(config, "get_text_config"):
        vocab = getattr(config.get_text_config(), "vocab_size", None)
    detail = f"{type(config).__name__} ({config.model_type})" + (f", vocab_size {vocab}" if vocab else "")
    return Check(name, PASS, detail), vocab


def _check_adapter_config(dest: Path) -> Check:
    """A PEFT adapter dir has adapter_config.json instead: it must load with peft's own LoraConfig."""
    name = "config.json"
    try:
        from peft import LoraConfig

        config = LoraConfig.from_pretrained(str(dest))
    except Exception as exc:  # peft missing, or any way the file is broken: a failed check, not a crash
        return Check(name, FAIL, f"{ADAPTER_CONFIG} does not load with peft's LoraConfig ({_first_line(exc)})")
    return Check(name, PASS, f"none (a PEFT adapter dir); {ADAPTER_CONFIG}: LoRA r={config.r}, "
                             f"lora_alpha={config.lora_alpha}, base {config.base_model_name_or_path}")  # fmt: skip


def _check_tokenizer(dest: Path, vocab_size: int | None) -> Check:
    name = "tokenizer"
    if not is_tokenizer_dir(dest):
        return Check(name, SKIP, "no tokenizer files")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(dest))
    except Exception as exc:  # as above: a failed check
        return Check(name, FAIL, f"AutoTokenizer cannot load it ({_first_line(exc)})")
    length = len(tokenizer)
    if vocab_size is not None and length > vocab_size:
        return Check(name, FAIL, f"{length} tokens but config.json's vocab_size is {vocab_size}: ids past it have "
                                 "no embedding row")  # fmt: skip
    template = "with a chat template" if getattr(tokenizer, "chat_template", None) else "no chat template"
    return Check(name, PASS, f"{type(tokenizer).__name__}, {length} tokens, {template}")


def _check_generation(dest: Path) -> Check:
    name = "generation_config.json"
    if not (dest / name).is_file():
        return Check(name, SKIP, "absent")
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(str(dest))
    except Exception as exc:  # as above: a failed check
        return Check(name, FAIL, f"GenerationConfig cannot load it ({_first_line(exc)})")
    ids = {k: getattr(config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return Check(name, PASS, ", ".join(f"{k} {v}" for k, v in ids.items() if v is not None) or "loads")


# ------------------------------------------------------------------------------------------------ the verdict


def evaluate(found: Survey, shares: Sequence[RankFindings], options: Options) -> list[Check]:
    """Every row of the table from the gathered findings. Pure; runs on: every rank (same result)."""
    files = sorted((f for s in shares for f in s.files), key=lambda f: f.name)
    dtype, said_by = declared_dtype(found, options.dtype)
    checks = [
        manifest_check(found),
        headers_check(files),
        index_check(found, files),
        checksums_check(found, files),
        dtype_check(found, files, dtype, said_by),
        source_check(shares, files, options),
    ]
    checks += list(shares[0].artifacts)
    return checks


def _summarize(problems: Sequence[str]) -> str:
    shown = "; ".join(problems[:MAX_DETAILS])
    return shown + (f"; and {len(problems) - MAX_DETAILS} more" if len(problems) > MAX_DETAILS else "")


def _row(name: str, problems: Sequence[str], ok: str) -> Check:
    return Check(name, FAIL, _summarize(problems)) if problems else Check(name, PASS, ok)


def manifest_check(found: Survey) -> Check:
    if found.manifest_error is not None:
        return Check("manifest", FAIL, found.manifest_error)
    source = found.manifest.get("source") or {}
    origin = f"; source {source.get('format')} {source.get('path')}" if isinstance(source, dict) and source else ""
    return Check("manifest", PASS, f"{len(found.manifest['files'])} weight file(s) listed{origin}")


def headers_check(files: Sequence[FileFindings]) -> Check:
    if not files:
        return Check("safetensors headers", FAIL, "no weight files (*.safetensors) in DEST")
    problems = [f"{f.name}: {f.header_error}" for f in files if f.header_error]
    tensors = sum(len(f.header.tensors) for f in files if f.header)
    return _row("safetensors headers", problems, f"{len(files)} file(s), {tensors} tensors")


def index_check(found: Survey, files: Sequence[FileFindings]) -> Check:
    """The index (or the single-file layout) against the tensors the headers hold. Pure."""
    name = "index"
    holders: dict[str, list[str]] = {}
    for f in files:
        for tensor in f.header.tensors if f.header else {}:
            holders.setdefault(tensor, []).append(f.name)
    problems = [f"{t!r} is in {len(h)} files ({', '.join(h)})" for t, h in sorted(holders.items()) if len(h) > 1]
    if found.index is None and found.index_error is None:
        problems += [f"{m} is missing" for m in found.missing]
        extra = [f.name for f in files if f.name != found.single_file]
        if extra:
            problems.append(f"no {INDEX_FILE}, but {len(files)} weight files ({', '.join(extra[:MAX_DETAILS])})")
        return _row(name, problems, f"no index needed: one file, {found.single_file}")
    if found.index_error is not None:
        return Check(name, FAIL, found.index_error)
    weight_map: Mapping[str, str] = found.index["weight_map"]
    problems += [f"{m}, named by the index, is missing" for m in found.missing]
    unreadable = {f.name for f in files if f.header is None} | set(found.missing)
    for tensor, file in sorted(weight_map.items()):
        held = holders.get(tensor, [])
        if file in unreadable:
            continue
        if not held:
            problems.append(f"{tensor!r} is mapped to {file} but no file holds it")
        elif file not in held:
            problems.append(f"{tensor!r} is mapped to {file} but lives in {held[0]}")
    problems += [f"{t!r} (in {h[0]}) is not in the index" for t, h in sorted(holders.items()) if t not in weight_map]
    problems += [f"{f.name} is not named by the index" for f in files if f.name not in set(weight_map.values())]
    total = sum(e.nbytes for f in files if f.header for e in f.header.tensors.values())
    declared = found.index["metadata"]["total_size"]
    if not unreadable and declared != total:
        problems.append(f"metadata.total_size is {declared}, the tensors hold {total} bytes")
    ok = f"{len(weight_map)} tensors in {len(set(weight_map.values()))} file(s), total_size {declared} bytes"
    return _row(name, problems, ok)


def checksums_check(found: Survey, files: Sequence[FileFindings]) -> Check:
    """Sizes and sha256s against the manifest. Pure."""
    name = "checksums"
    if found.manifest is None:
        return Check(name, SKIP, "not checked: no usable manifest (see the manifest row)")
    listed: Mapping[str, Mapping[str, Any]] = found.manifest["files"]
    by_name = {f.name: f for f in files}
    problems, seen = [], set()
    for weight in found.files:
        entry = listed.get(weight.manifest_key)
        seen.add(weight.manifest_key)
        got = by_name.get(weight.name)
        if entry is None:
            problems.append(f"{weight.name} is not in the manifest")
        elif got is None or got.sha256 is None:
            problems.append(f"{weight.name} could not be read")
        elif got.size != entry["size"]:
            problems.append(f"{weight.name} has {got.size} bytes, the manifest says {entry['size']}")
        elif got.sha256 != entry["sha256"]:
            problems.append(f"{weight.name}: sha256 differs from the manifest (the file changed after finalize)")
    problems += [f"{key}, listed in the manifest, is missing" for key in sorted(set(listed) - seen)]
    return _row(name, problems, f"{len(found.files)} file(s): size and sha256 match the manifest")


def dtype_check(found: Survey, files: Sequence[FileFindings], dtype: torch.dtype | None, said_by: str) -> Check:
    """Every floating tensor has the declared dtype, and every quantized weight's tensors the dtypes its recipe
    stores (as the manifest records the recipe); the manifest and config.json agree. Pure."""
    name = "dtype"
    if dtype is None:
        return Check(name, SKIP, "DEST declares no dtype (no manifest dtype, no dtype in config.json)")
    problems = []
    manifest_dtype = (found.manifest or {}).get("dtype")
    from_config = config_dtype(found.config)
    if manifest_dtype in DTYPES and from_config is not None and manifest_dtype != from_config:
        problems.append(f"{MANIFEST} says {manifest_dtype} but config.json says {from_config}")
    try:
        quant = recorded_quantization(found.manifest)
    except DistfinalizeError as exc:
        quant, problems = None, [*problems, exc.what]
    stored = get_recipe(quant.recipe).stored_dtypes(dtype) if quant else {}
    quantized = 0
    for f in files:
        if f.header is None:
            continue
        special = quantized_outputs(f.header.tensors, stored)
        quantized += len(special) // max(len(stored), 1)
        plain = SAFETENSORS_DTYPES[dtype]
        floats = sorted(
            n for n, e in f.header.tensors.items() if n not in special and _is_float(e.dtype) and e.dtype != plain
        )
        if floats:
            got = f.header.tensors[floats[0]].dtype
            problems.append(f"{f.name}: {len(floats)} floating tensor(s) are not {_dt(dtype)}, e.g. {floats[0]!r} "
                            f"({_dt(TORCH_DTYPES.get(got, got))})")  # fmt: skip
        stored_wrong = sorted(n for n, d in special.items() if f.header.tensors[n].dtype != SAFETENSORS_DTYPES[d])
        if stored_wrong:
            n = stored_wrong[0]
            got = f.header.tensors[n].dtype
            problems.append(f"{f.name}: {len(stored_wrong)} tensor(s) of quantized weights are not as the "
                            f"{quant.recipe} recipe stores them, e.g. {n!r} is {_dt(TORCH_DTYPES.get(got, got))}, "
                            f"not {_dt(special[n])}")  # fmt: skip
    stored_note = f"; {quantized} weight(s) stored as the {quant.recipe} recipe stores them" if quant else ""
    return _row(name, problems, f"every floating tensor is {_dt(dtype)} (as {said_by} says){stored_note}")


def quantized_outputs(names: Iterable[str], stored: Mapping[str, torch.dtype]) -> dict[str, torch.dtype]:
    """Name -> dtype of the tensors of quantized weights: modules holding every suffix the recipe stores. Pure."""
    if not stored:
        return {}
    names = set(names)
    first = next(iter(stored))
    modules = [n.removesuffix(f".{first}") for n in names if n.endswith(f".{first}")]
    return {f"{m}.{suffix}": d for m in modules if all(f"{m}.{s}" in names for s in stored)
            for suffix, d in stored.items()}  # fmt: skip


def source_check(shares: Sequence[RankFindings], files: Sequence[FileFindings], options: Options) -> Check:
    """The tensor comparisons of every rank, and whether every source tensor made it to DEST. Pure."""
    name = "source tensors"
    if options.source is None:
        return Check(name, SKIP, "no --source given")
    errors = list(dict.fromkeys(s.source.error for s in shares if s.source is not None and s.source.error))
    if errors:
        return Check(name, FAIL, f"cannot open the source: {errors[0]}")
    summary = shares[0].source
    problems = [p for f in files for p in f.comparison.problems]
    unreadable = [f.name for f in files if f.header is None]
    present = {t for f in files if f.header for t in f.header.tensors}
    if not unreadable:
        absent = [n for n in summary.names if n not in present and n not in summary.may_be_absent]
        problems += [f"{n!r}, made from the source, is not in DEST" for n in absent]
    compared = sum(f.comparison.compared for f in files)
    grown = sum(f.comparison.grown for f in files)
    quantized = sum(f.comparison.quantized for f in files)
    note = f" ({grown} embedding(s) with new token rows: their first rows compared)" if grown else ""
    if summary.merged:
        note += f" ({summary.merged} of them merged LoRA weights: within rounding of the merge redone here)"
    exact = f"{compared - quantized} tensors bit-exact"
    if quantized:
        exact += f" and {quantized} quantized weight(s) within the recipe's rounding bound"
    return _row(name, problems, f"{exact} against {summary.description}{note}")


def _is_float(code: str) -> bool:
    return code.startswith(("F", "BF"))


def _dt(dtype: object) -> str:
    return str(dtype).removeprefix("torch.")


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


def as_json(found: Survey, checks: Sequence[Check], shares: Sequence[RankFindings], options: Options) -> dict:
    files = sorted((f for s in shares for f in s.files), key=lambda f: f.name)
    return {
        "dest": str(found.dest),
        "source": str(options.source) if options.source is not None else None,
        "passed": not any(c.status == FAIL for c in checks),
        "checks": [asdict(c) for c in checks],
        "files": [
            {
                "file": f.name,
                "rank": f.rank,
                "size": f.size,
                "sha256": f.sha256,
                "tensors": len(f.header.tensors) if f.header else None,
            }
            for f in files
        ],
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distfinalize verify",
        description="Check a finalized model dir: safetensors headers, the index, the manifest's checksums, dtypes, "
        "and (with --source) every tensor against the training checkpoint; config, tokenizer and generation "
        "config load with transformers. Exit 1 when a check fails.",
        epilog="Run alone, or under torchrun to split the files over ranks: "
        "torchrun --nproc_per_node=N -m distfinalize verify DEST --source SRC",
    )
    parser.add_argument("dest", type=Path, metavar="DEST", help="the finalized model directory")
    parser.add_argument("--source", type=Path, metavar="SRC", help="the training checkpoint DEST was made from")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        metavar="PATH",
        help="the checkpoint under SRC (default: the one the manifest records, else the latest)",
    )
    parser.add_argument("--tag", help="DeepSpeed tag (global_stepN) under SRC")
    parser.add_argument("--dtype", choices=list(DTYPES),
                        help="the dtype the floating tensors must have (default: what DEST declares)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    add_timeout_option(parser)
    return parser


def parse_options(argv: Sequence[str]) -> Options:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.checkpoint is not None or args.tag is not None) and args.source is None:
        parser.error("--checkpoint and --tag need --source")
    return Options(args.dest, args.source, args.checkpoint, args.tag, args.dtype, args.log_level, args.json,
                   args.timeout, progress=args.log_level in ("debug", "info") and not args.json)  # fmt: skip


def main(argv: Sequence[str]) -> int:
    """`distfinalize verify ...`: returns 0 when every check passed or was skipped, 1 otherwise.

    Runs on: all ranks; rank 0 prints.
    """
    from distfinalize.cli import emit, run_guarded

    options = parse_options(argv)

    def job(ctx: DistContext) -> int:
        surveyed: list[Survey] = []

        def share() -> RankFindings:
            surveyed.append(survey(options.dest))
            return verify_share(options, surveyed[0], ctx.rank, ctx.world_size)

        shares = ctx.run_step("verify", share)  # the one gather: every rank's findings, on every rank
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
