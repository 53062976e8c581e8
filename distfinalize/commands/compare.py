"""Output tensors against the source checkpoint, bit for bit after the transforms finalize applies.

The source is opened the way finalize opens it (pipeline.prepare, metadata only) and each output tensor gets the
TensorPlan finalize would give it (plan.plan_tensors: dtype, key-map transforms such as the rotary permutation).
The expected tensor is the source tensor through finalize's own `to_output`, without the vocabulary resize: new
token rows cannot be rebuilt from DEST, so an embedding that grew is compared on its first rows. Each rank reads
only the source bytes of the tensors in its own output files. Runs on: every rank, for its own files.

Quantized output (the manifest records the recipe and the --quantize-ignore patterns, so verify quantizes the
same weights finalize did): each quantized weight's tensors must have the recipe's names, shapes and dtypes, and
their dequantized value must lie within the recipe's round-to-nearest bound of the source weight, elementwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from distfinalize.commands.hfdir import Header, Survey, WeightFile
from distfinalize.commit.manifest import recorded_key_map, recorded_options, recorded_quantization
from distfinalize.config import FinalizeConfig, LoraOptions
from distfinalize.plan import TensorPlan, plan_tensors
from distfinalize.prepare.prepared import Prepared, prepare
from distfinalize.transform.cast import to_output
from distfinalize.transform.names import TIE_CANDIDATES
from distfinalize.transform.quant.selection import embedding_names, quantized_tensors
from distfinalize.write.feed import read_batches

READ_BATCH_BYTES = 512 * 2**20  # source bytes read at once per file compared
BIT_VIEWS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Expectation:
    """What one output tensor must be: its source tensor through `plan` (without a vocabulary resize)."""

    plan: TensorPlan
    rows_may_grow: bool = False  # an embedding matrix: new token rows may follow the source's
    tied: tuple[tuple[str, str], ...] = ()  # (key, name) of source heads dropped as tied to it: equal to it too

    @property
    def key(self) -> str:
        return self.plan.source_key


def recorded_checkpoint(manifest: Mapping[str, Any] | None, src: Path) -> Path | None:
    """The checkpoint folder DEST's manifest records: relative to SRC (absolute in manifests of older versions)."""
    source = manifest.get("source") if manifest else None
    recorded = source.get("path") if isinstance(source, dict) else None
    return src / recorded if isinstance(recorded, str) and recorded else None


def open_source(
    src: Path, found: Survey, checkpoint: Path | None = None, tag: str | None = None, log_level: str = "info"
) -> tuple[Prepared, dict[str, str]]:
    """Open SRC the way finalize does (metadata only); also which weights finalize quantized (name -> recipe).

    Runs on: every rank. The checkpoint: `checkpoint` / `tag`, else the one DEST's manifest records when it lies
    inside SRC, else the latest. Names are mapped through the source's config.json, else DEST's, with the key map
    the manifest records.
    """
    recorded = recorded_checkpoint(found.manifest, src)
    if (
        checkpoint is None
        and tag is None
        and recorded is not None
        and recorded.is_dir()
        and recorded.resolve().is_relative_to(src.resolve())
    ):
        checkpoint = recorded
    quant = recorded_quantization(found.manifest)
    base_model = found.dest if (found.dest / "config.json").is_file() else None
    lora = LoraOptions()
    record = found.manifest.get("lora") if found.manifest else None
    if isinstance(record, dict):  # a LoRA finalize: redo it as recorded; DEST's weights are not the base model's
        lora, base_model = recorded_options(record, src)
    config = FinalizeConfig(
        src=src,
        checkpoint=checkpoint,
        tag=tag,
        base_model=base_model,
        log_level=log_level,
        key_map=recorded_key_map(found.manifest),
        quantize=quant.recipe if quant else None,
        quantize_ignore=quant.ignore if quant else (),
        lora=lora,
    )
    prepared = prepare(config)
    return prepared, quantized_tensors(config, prepared)


def expectations(
    prepared: Prepared, dtype: torch.dtype | None, tied: bool, quant: Mapping[str, str] | None = None
) -> tuple[dict[str, Expectation], tuple]:
    """What each output tensor must equal (keyed by the plan's name), and the source tensors DEST may lack (heads
    dropped as tied). Pure."""
    embeddings = set(embedding_names(prepared))
    plans = plan_tensors(prepared.tensors, dtype, rope_heads=prepared.rope_heads, quant=quant, merges=prepared.merges)
    out = {p.name: Expectation(p, p.name in embeddings) for p in plans}
    absent = []
    if tied:
        for head, embed in TIE_CANDIDATES:
            if head in out and embed in out:
                out[embed] = replace(out[embed], tied=(*out[embed].tied, (out[head].key, head)))
                absent.append(head)
    return out, tuple(absent)


def compare(
    outputs: Mapping[str, torch.Tensor], source: torch.Tensor, want: Expectation, lora: Sequence[torch.Tensor] = ()
) -> tuple[str | None, bool]:
    """Compare the output tensors of one plan entry with its source tensor (and LoRA factors `lora`). Pure.

    Bit for bit after finalize's transforms; a quantized weight dequantized, within its recipe's bound; a merged
    LoRA weight within the rounding of another device's matmul and one rounding to the output dtype.
    Returns (the problem, or None; whether only the first rows were compared).
    """
    if want.plan.quant is not None:
        return compare_quantized(outputs, source, want.plan, lora), False
    output = outputs[want.plan.name]
    if output.dtype != want.plan.dtype:
        return f"is {_dt(output.dtype)}, expected {_dt(want.plan.dtype)}", False
    expected = to_output(source, want.plan, CPU, lora)[want.plan.name]  # never resized here
    grown = False
    if tuple(output.shape) != tuple(expected.shape):
        rows = expected.shape[0] if expected.dim() else 0
        if not (
            want.rows_may_grow
            and expected.dim()
            and output.dim() == expected.dim()
            and output.shape[1:] == expected.shape[1:]
            and output.shape[0] > rows
        ):
            return f"has shape {list(output.shape)}, the source's is {list(expected.shape)}", False
        output, grown = output[:rows], True
    if want.plan.lora is not None:
        return merge_problem(output, expected), grown
    count, first = differing_elements(output, expected)
    if count:
        part = f"of the first {expected.shape[0]} rows " if grown else ""
        return (
            f"differs from the source in {count} of {expected.numel()} element(s) {part}(first at flat index {first})"
        ), grown
    return None, grown


def compare_quantized(
    outputs: Mapping[str, torch.Tensor], source: torch.Tensor, plan: TensorPlan, lora: Sequence[torch.Tensor] = ()
) -> str | None:
    """A quantized weight: the recipe's tensors (names, shapes, dtypes), dequantized within the recipe's
    round-to-nearest bound of the source weight (after the key map's permutations), elementwise. Pure."""
    from distfinalize.transform.quant.recipes import get_recipe

    recipe = get_recipe(plan.quant)
    for name, (shape, dtype) in plan.outputs.items():
        got = outputs[name]
        if (tuple(got.shape), got.dtype) != (tuple(shape), dtype):
            return (
                f"is stored with {name!r} as {_dt(got.dtype)} {list(got.shape)}; the {recipe.name} recipe "
                f"stores it as {_dt(dtype)} {list(shape)}"
            )
    weight = to_output(source, replace(plan, quant=None, dtype=torch.float32), CPU, lora)[plan.name]
    dequantized = recipe.dequantize(dict(outputs))
    outside = ~((dequantized - weight).abs() <= recipe.error_bound(weight, dict(outputs)))  # NaN is outside too
    count = int(outside.sum())
    if count:
        first = int(outside.reshape(-1).nonzero()[0, 0])
        return (
            f"dequantized, lies outside the {recipe.name} rounding bound of the source in {count} of "
            f"{weight.numel()} element(s) (first at flat index {first})"
        )
    return None


def merge_problem(output: torch.Tensor, expected: torch.Tensor) -> str | None:
    """A merged weight against the merge redone on the CPU: 8 float32 ulps (matmul order) plus one ulp of the output
    dtype, relative to the largest element."""
    diff = (output.float() - expected.float()).abs().max().item()
    bound = (8 * torch.finfo(torch.float32).eps + torch.finfo(output.dtype).eps) * expected.float().abs().max().item()
    if diff > bound:
        return f"differs from the LoRA merge redone on the CPU by {diff:.3g} (more than {bound:.3g})"
    return None


def differing_elements(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int | None]:
    """How many elements of two same-dtype tensors differ in their bits (NaNs compared as bits), and the first."""
    view = BIT_VIEWS[a.element_size()]
    x = a.contiguous().reshape(-1).view(view)
    y = b.contiguous().reshape(-1).view(view)
    unequal = x != y
    count = int(unequal.sum())
    return count, (int(unequal.nonzero()[0, 0]) if count else None)


@dataclass(frozen=True)
class FileComparison:
    """What comparing one output file with the source found."""

    compared: int = 0  # plan entries compared with their source tensor
    grown: int = 0  # of those, embeddings with rows beyond the source's (first rows compared)
    quantized: int = 0  # of those, quantized weights (compared within the recipe's bound)
    problems: tuple[str, ...] = ()


def compare_file(
    weight: WeightFile, header: Header, wanted: Mapping[str, Expectation], reader: Any, batch_bytes: int
) -> FileComparison:
    """Compare every tensor of one output file with the source.

    Runs on: the rank that owns the file; reads only the source bytes of the file's tensors.
    """
    from safetensors import safe_open

    owner = {output: name for name, want in wanted.items() for output in want.plan.outputs}
    problems, compared, grown, quantized = [], 0, 0, 0
    names = sorted(header.tensors)
    problems += [f"{weight.name}: {n!r} is not in the source checkpoint" for n in names if n not in owner]
    present = list(dict.fromkeys(owner[n] for n in names if n in owner))
    for name in present:
        lacking = [o for o in wanted[name].plan.outputs if o not in header.tensors]
        if lacking:
            problems.append(f"{weight.name}: {lacking[0]!r}, stored with {name!r}, is not in this file")
    present = [n for n in present if all(o in header.tensors for o in wanted[n].plan.outputs)]
    with safe_open(str(weight.path), framework="pt") as f:
        sizes = {n: wanted[n].plan.source_nbytes * (1 + len(wanted[n].tied)) for n in present}
        for batch in read_batches(present, batch_bytes, sizes.__getitem__):
            keys = [k for n in batch for k in (*(k for k, _ in _sources(n, wanted[n])), *wanted[n].plan.source_keys)]
            data = reader.read(list(dict.fromkeys(keys)))
            for name in batch:
                want = wanted[name]
                outputs = {o: f.get_tensor(o) for o in want.plan.outputs}
                lora = [data[k] for k in want.plan.source_keys[1:]]
                for key, label in _sources(name, want):
                    problem, was_grown = compare(outputs, data[key], want, lora)
                    if key == want.key:
                        compared, grown = compared + 1, grown + was_grown
                        quantized += want.plan.quant is not None
                    if problem is not None:
                        problems.append(f"{weight.name}: {label} {problem}")
            del data
    return FileComparison(compared, grown, quantized, tuple(problems))


def _sources(name: str, want: Expectation) -> list[tuple[str, str]]:
    """(source key, label) of every source tensor an output tensor must equal: its own, and tied heads."""
    return [(want.key, repr(name)), *((key, f"{head!r} (dropped as tied to {name!r})") for key, head in want.tied)]


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
