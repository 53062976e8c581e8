"""`distfinalize inspect SRC`: what a checkpoint holds and what a finalize of it would do. Writes nothing.

    python -m distfinalize inspect SRC [--checkpoint PATH] [--tag TAG] [--json] [--world-size N]
    torchrun --nproc_per_node=N -m distfinalize inspect SRC          (rank 0 prints)

It reports:
- the format: DCP, DeepSpeed ZeRO stage N, or a Hugging Face model dir. SRC is a model dir when it holds
  safetensors weights at its top and no checkpoint is found in it: a training dir with checkpoints is
  inspected as the checkpoint a finalize would use, even when it also holds a saved model;
- the checkpoint chosen (as finalize chooses it), its step and the world size that saved it;
- the stored tensors by kind, with bytes (numel x itemsize, from metadata alone) per dtype:
  model (what finalize reads), optimizer (DCP: entries under optim/optimizer containers, and Accelerate's
  optimizer_0/ beside the model; DeepSpeed: the optimizer states files less the fp32 master partitions, which
  hold the model) and other (scheduler, RNG, trainer state; DeepSpeed: the module's own copy in the model
  states files). Non-tensor entries (e.g. optimizer hyperparameters) are counted, not sized;
- the plan finalize would use: pipeline.run with --dry-run, so the same dtype choice, tie check, tokenizer and
  vocabulary resize, for --world-size ranks (default: this job's world size). Like finalize, rank 0 then reads
  lm_head and embed_tokens when config.json does not say they are tied (the only tensor data read);
- what is missing: config.json, tokenizer, chat template, generation_config.json.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distfinalize.commands.arguments import inspect_args
from distfinalize.commands.breakdown import BREAKDOWNS, KINDS, Breakdown, Tally, _tallies, plan_breakdown, tally_dcp
from distfinalize.config import (
    FinalizeConfig,
    LoraOptions,
    format_bytes,
)
from distfinalize.errors import SourceError
from distfinalize.hfnames import INDEX_FILE, SAFETENSORS_DTYPES
from distfinalize.plan import Plan, assign_pieces, describe

if TYPE_CHECKING:
    from distfinalize.dist.context import DistContext
    from distfinalize.pipeline import Outcome

log = logging.getLogger(__name__)

CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


@dataclass(frozen=True)
class Options:
    src: Path
    checkpoint: Path | None = None
    tag: str | None = None
    as_json: bool = False
    world_size: int | None = None
    max_shard_size: int = 5 * 10**9
    dtype: str | None = None
    log_level: str = "info"
    timeout_s: float = 1800.0


# ------------------------------------------------------------------------------------------------ breakdowns


# ------------------------------------------------------------------------------------------------ reports


def source_kind(options: Options) -> str:
    """Whether SRC holds a checkpoint finalize would use ("checkpoint") or is itself a safetensors model dir ("hf",
    which finalize also reads, to reshard, cast or quantize it).

    Raises locate's SourceError when it is neither. Runs on: every rank.
    """
    from distfinalize.sources.locate import locate

    try:
        found = locate(options.src, options.checkpoint, options.tag)
    except SourceError:
        if options.checkpoint is None and options.tag is None and has_weights(options.src):
            return "hf"
        raise
    chosen = options.checkpoint is not None or options.tag is not None
    if found.format.fallback and found.path == options.src and not chosen and has_weights(options.src):
        return "hf"  # SRC is itself a model dir (e.g. a finalized DEST): reported as one
    return "checkpoint"


def has_weights(directory: Path) -> bool:
    return directory.is_dir() and ((directory / INDEX_FILE).is_file() or any(directory.glob("*.safetensors")))


def replan(plan: Plan, world_size: int) -> Plan:
    """The same files for another world size: cut into pieces the way build_plan cuts them. Pure."""
    if world_size == plan.world_size:
        return plan
    return assign_pieces(plan, world_size)


def finalize_config(options: Options) -> FinalizeConfig:
    """The finalize a plain `distfinalize SRC DEST` would run, as a dry run with no DEST."""
    return FinalizeConfig(
        src=options.src,
        checkpoint=options.checkpoint,
        tag=options.tag,
        dtype=options.dtype,
        max_shard_size=options.max_shard_size,
        dry_run=True,
        log_level=options.log_level,
        timeout_s=options.timeout_s,
        lora=LoraOptions(require_alpha=False),
    )


def inspect_checkpoint(options: Options, outcome: Outcome, world_size: int) -> dict[str, Any]:
    """The report for a training checkpoint, from a dry run's outcome. Runs on: rank 0."""
    from distfinalize.artifacts.generation import find_generation_config
    from distfinalize.sources.locate import find_model_config

    info = outcome.info
    plan = replan(outcome.plan, world_size)
    breakdown = BREAKDOWNS[info.format](info.path) if info.format in BREAKDOWNS else plan_breakdown(plan)
    log.debug("stored tensors of %s: %s", info.path, {k: t.bytes for k, t in breakdown.tallies.items()})
    config_path = find_model_config(info.path, options.src)
    generation = find_generation_config(config_path)
    tokenizer = outcome.report.get("tokenizer", {})
    found = {
        "config.json": str(config_path) if config_path else None,
        "tokenizer": tokenizer.get("from"),
        "chat_template": bool(tokenizer.get("chat_template")),
        "generation_config.json": str(generation) if generation else None,
    }
    floating = sorted({str(t.dtype).removeprefix("torch.") for t in plan.tensors if t.dtype.is_floating_point})
    resized = {t.name: {"from": t.source_shape[0], "to": t.shape[0]} for t in plan.tensors if t.resize is not None}
    report = make_report(
        options,
        info.format,
        breakdown,
        info.path,
        info.step,
        info.saved_world_size,
        found,
        plan=dict(
            describe(plan),
            output_dtype=", ".join(floating) or None,
            resized=resized,
            tokens_added=[token for token, _ in tokenizer.get("added", [])],
        ),
    )
    report["lora"] = outcome.report.get("lora")
    return report


def inspect_model_dir(options: Options) -> dict[str, Any]:
    """The report for a Hugging Face model dir (e.g. a finalized DEST). Runs on: rank 0."""
    from distfinalize.artifacts.tokenizer import is_tokenizer_dir
    from distfinalize.commands.hfdir import HeaderError, read_header, survey
    from distfinalize.sources.dcp import read_metadata

    found_dir = survey(options.src)
    tallies = _tallies()
    for weight in found_dir.files:
        try:
            header = read_header(weight.path)
        except HeaderError as exc:
            raise SourceError(
                "a weight file is not readable safetensors",
                where=weight.path,
                hint=f"{exc}; `distfinalize verify` checks the whole dir",
            ) from exc
        for entry in header.tensors.values():
            tallies["model"].add(_SAFETENSORS_NAMES.get(entry.dtype, entry.dtype), entry.nbytes)
    src = options.src
    for kept in sorted(src.glob("checkpoints/*/optimizer/.metadata")):  # --keep-optimizer: a DCP dir
        tally_dcp(read_metadata(kept.parent), lambda key: "optimizer", tallies)
    tokenizer = is_tokenizer_dir(src)
    found = {
        "config.json": _file(src / "config.json"),
        "tokenizer": str(src) if tokenizer else None,
        "chat_template": tokenizer and _has_chat_template(src),
        "generation_config.json": _file(src / "generation_config.json"),
    }
    source = (found_dir.manifest or {}).get("source") or {}
    out = make_report(options, "hf", Breakdown(tallies), src, source.get("step"), None, found, plan=None)
    out["manifest"] = source or None
    return out


_SAFETENSORS_NAMES = {code: str(dtype).removeprefix("torch.") for dtype, code in SAFETENSORS_DTYPES.items()}


def _file(path: Path) -> str | None:
    return str(path) if path.is_file() else None


def _has_chat_template(directory: Path) -> bool:
    if any((directory / name).is_file() for name in CHAT_TEMPLATE_FILES):
        return True
    try:
        return bool(json.loads((directory / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return False


def make_report(
    options: Options,
    fmt: str,
    breakdown: Breakdown,
    checkpoint: Path,
    step: int | None,
    saved_world_size: int | None,
    found: Mapping[str, Any],
    plan: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The report as JSON-able data (what --json prints; the text is rendered from it)."""
    total = Tally()
    for tally in breakdown.tallies.values():
        total.tensors += tally.tensors
        total.bytes += tally.bytes
        total.objects += tally.objects
        for dtype, nbytes in tally.by_dtype.items():
            total.by_dtype[dtype] = total.by_dtype.get(dtype, 0) + nbytes
    missing = [name for name in ("config.json", "tokenizer") if not found.get(name)]
    if not found.get("chat_template"):
        missing.append("chat template")
    if not found.get("generation_config.json"):
        missing.append("generation_config.json")
    from distfinalize.sources.formats import FORMATS

    name = FORMATS[fmt].title if fmt in FORMATS else "Hugging Face model dir"
    return {
        "src": str(options.src),
        "format": fmt,
        "format_name": f"{name} {breakdown.detail}" if breakdown.detail else name,
        "checkpoint": str(checkpoint),
        "step": step,
        "saved_world_size": saved_world_size,
        "tensors": {kind: breakdown.tallies[kind].as_dict() for kind in KINDS} | {"total": total.as_dict()},
        "plan": plan,
        "found": dict(found),
        "missing": missing,
    }


# ------------------------------------------------------------------------------------------------ text


MISSING_HINTS = {
    "config.json": "a finalize fails; pass --base-model DIR|HUB_ID, or --tensors-only to write names as stored",
    "tokenizer": "DEST gets none; pass --tokenizer PATH or --base-model DIR|HUB_ID",
    "chat template": "pass --chat-template FILE for chat models",
    "generation_config.json": "a minimal one (bos/eos/pad ids) is written",
}


def _size(nbytes: int) -> str:
    return f"{nbytes} B" if nbytes < 1024 else f"{nbytes} B ({format_bytes(nbytes)})"


def format_report(data: Mapping[str, Any]) -> str:
    """The report as text: one `label  value` line per item, tables for tensors and the plan."""
    lines = [f"distfinalize inspect {data['src']}"]

    def item(label: str, value: object) -> None:
        lines.append(f"{label:<17} {value}")

    item("format", data["format_name"])
    item("checkpoint", data["checkpoint"])
    item("step", data["step"] if data["step"] is not None else "unknown")
    item("saved by", f"{data['saved_world_size']} rank(s)" if data["saved_world_size"] else "unknown")
    lines.append(f"{'stored tensors':<17} {'kind':<10} {'tensors':>7}  {'bytes':>24}  by dtype")
    for kind in (*KINDS, "total"):
        t = data["tensors"][kind]
        dtypes = ", ".join(f"{d} {n}" for d, n in t["by_dtype"].items())
        lines.append(f"{'':<17} {kind:<10} {t['tensors']:>7}  {_size(t['bytes']):>24}  {dtypes}")
    objects = {k: data["tensors"][k]["objects"] for k in KINDS if data["tensors"][k]["objects"]}
    if objects:
        lines.append(
            f"{'':<17} and {sum(objects.values())} non-tensor entries ("
            + ", ".join(f"{k} {n}" for k, n in objects.items())
            + ")"
        )
    plan = data["plan"]
    if plan is None:
        item("plan", "none: SRC is already a Hugging Face model dir; `distfinalize verify SRC` checks it")
    else:
        item(
            "plan",
            f"{len(plan['files'])} file(s), {_size(plan['total_size'])}, {plan['tensors']} tensors, "
            f"output dtype {plan['output_dtype'] or 'as stored'}, {plan['world_size']} rank(s)",
        )
        width = max(len(f["file"]) for f in plan["files"])
        lines.append(f"{'':<17}   {'file':<{width}}  rank  tensors  bytes")
        lines += [
            f"{'':<17}   {f['file']:<{width}}  {str(f['rank']) + '+' * ('pieces' in f):>4}  "
            f"{f['tensors']:>7}  {f['bytes']}"
            for f in plan["files"]
        ]
        if any("pieces" in f for f in plan["files"]):  # the first piece's rank writes the header
            lines.append(f"{'':<17}   +: written in pieces by several ranks (--json lists them)")
        lines.append(
            f"{'':<17}   bytes per rank: " + ", ".join(f"rank {r}: {b}" for r, b in enumerate(plan["bytes_per_rank"]))
        )
        for name, rows in plan["resized"].items():
            item("vocabulary", f"{name}: {rows['from']} -> {rows['to']} rows")
        if plan["tokens_added"]:
            item("tokens added", ", ".join(plan["tokens_added"]))
    lora = data.get("lora")
    if lora:
        alpha = lora["lora_alpha"] if lora["lora_alpha"] is not None else "unknown (pass --lora-alpha to finalize)"
        item(
            "LoRA",
            f"r={lora['r']}, lora_alpha={alpha}{', rsLoRA' if lora['use_rslora'] else ''}, targets "
            f"{', '.join(lora['target_modules'] or [])}; trained copies: "
            f"{', '.join(lora['modules_to_save'] or []) or 'none'}",
        )
        item(
            "",
            f"settings from {lora['config_from']}; finalize writes a PEFT adapter dir (--merge-lora: the merged model)",
        )
    found = data["found"]
    item("config.json", found["config.json"] or "missing")
    item("tokenizer", found["tokenizer"] or "missing")
    item("chat template", "yes" if found["chat_template"] else "missing")
    item("generation config", found["generation_config.json"] or "missing")
    if data.get("manifest"):
        m = data["manifest"]
        item("made from", f"{m.get('format')} checkpoint {m.get('path')} (step {m.get('step')}), per its manifest")
    for name in data["missing"]:
        hint = MISSING_HINTS[name] if data["plan"] is not None else "transformers users may need it"
        item("missing", f"{name}: {hint}")
    return "\n".join(line.rstrip() for line in lines)


# ------------------------------------------------------------------------------------------------ CLI


def parse_options(argv: Sequence[str]) -> Options:
    args = inspect_args(argv)
    return Options(
        args.src,
        args.checkpoint,
        args.tag,
        args.json,
        args.world_size,
        args.max_shard_size,
        args.dtype,
        args.log_level,
        args.timeout,
    )


def nothing(_: object) -> None:
    """What the other ranks need of the report: nothing (rank 0 prints it)."""


def main(argv: Sequence[str]) -> int:
    """`distfinalize inspect ...`: print the report (rank 0) and return 0. Runs on: all ranks."""
    from distfinalize.commands.runner import emit, run_guarded

    options = parse_options(argv)

    def job(ctx: DistContext) -> int:
        from distfinalize.pipeline import run

        kind = ctx.run_step("locate", lambda: source_kind(options))
        if kind == "hf":
            data = ctx.run_step("inspect", lambda: inspect_model_dir(options), ranks="rank0", share=nothing)
        else:
            outcome = run(finalize_config(options), ctx)
            world = options.world_size or ctx.world_size
            data = ctx.run_step(
                "inspect", lambda: inspect_checkpoint(options, outcome, world), ranks="rank0", share=nothing
            )
        if ctx.is_rank0:
            emit(json.dumps(data, indent=2) if options.as_json else format_report(data))
        return 0

    return run_guarded(job, log_level=options.log_level, device="cpu", timeout_s=options.timeout_s)
