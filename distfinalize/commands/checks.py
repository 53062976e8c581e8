"""verify's rows: each check of a finalized directory, from the findings every rank gathered. Pure. Runs on: rank
0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from distfinalize.artifacts.tokenizer import is_tokenizer_dir
from distfinalize.commands.compare import (
    FileComparison,
)
from distfinalize.commands.hfdir import Header, Survey, config_dtype
from distfinalize.commit.manifest import MANIFEST, recorded_quantization
from distfinalize.errors import DistfinalizeError
from distfinalize.hfnames import ADAPTER_CONFIG, DTYPES, INDEX_FILE, SAFETENSORS_DTYPES
from distfinalize.transform.quant.recipes import get_recipe

PASS, FAIL, SKIP = "pass", "fail", "skip"


MAX_DETAILS = 4  # problems named in a row's detail; the rest are counted
TORCH_DTYPES = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}


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
    pieces: tuple[str, ...] = ()  # the sha256 of each byte range the manifest records (a file several ranks wrote)


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
        return Check(
            name, FAIL, "absent: transformers cannot load the model without it (finalize with --base-model DIR)"
        ), None
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
    return Check(
        name,
        PASS,
        f"none (a PEFT adapter dir); {ADAPTER_CONFIG}: LoRA r={config.r}, "
        f"lora_alpha={config.lora_alpha}, base {config.base_model_name_or_path}",
    )


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
        return Check(
            name,
            FAIL,
            f"{length} tokens but config.json's vocab_size is {vocab_size}: ids past it have no embedding row",
        )
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
        elif "pieces" in entry:
            digests = got.pieces if len(got.pieces) == len(entry["pieces"]) else [None] * len(entry["pieces"])
            problems += [
                f"{weight.name}: bytes [{start}, {stop}) differ from the manifest's sha256 (the file changed after "
                "finalize, or the rank that wrote them failed to)"
                for (start, stop, want), have in zip(entry["pieces"], digests, strict=True)
                if have != want
            ]
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
            problems.append(
                f"{f.name}: {len(floats)} floating tensor(s) are not {_dt(dtype)}, e.g. {floats[0]!r} "
                f"({_dt(TORCH_DTYPES.get(got, got))})"
            )
        stored_wrong = sorted(n for n, d in special.items() if f.header.tensors[n].dtype != SAFETENSORS_DTYPES[d])
        if stored_wrong:
            n = stored_wrong[0]
            got = f.header.tensors[n].dtype
            problems.append(
                f"{f.name}: {len(stored_wrong)} tensor(s) of quantized weights are not as the "
                f"{quant.recipe} recipe stores them, e.g. {n!r} is {_dt(TORCH_DTYPES.get(got, got))}, "
                f"not {_dt(special[n])}"
            )
    stored_note = f"; {quantized} weight(s) stored as the {quant.recipe} recipe stores them" if quant else ""
    return _row(name, problems, f"every floating tensor is {_dt(dtype)} (as {said_by} says){stored_note}")


def quantized_outputs(names: Iterable[str], stored: Mapping[str, torch.dtype]) -> dict[str, torch.dtype]:
    """Name -> dtype of the tensors of quantized weights: modules holding every suffix the recipe stores. Pure."""
    if not stored:
        return {}
    names = set(names)
    first = next(iter(stored))
    modules = [n.removesuffix(f".{first}") for n in names if n.endswith(f".{first}")]
    return {
        f"{m}.{suffix}": d for m in modules if all(f"{m}.{s}" in names for s in stored) for suffix, d in stored.items()
    }


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
