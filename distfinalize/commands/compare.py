"""Output tensors against the source checkpoint, bit for bit after the transforms finalize applies.

The source is opened the way finalize opens it (pipeline.prepare, metadata only) and each output tensor gets the
TensorPlan finalize would give it (plan.plan_tensors: dtype, key-map transforms such as the rotary permutation).
The expected tensor is the source tensor through finalize's own `to_output`, without the vocabulary resize: new
token rows cannot be rebuilt from DEST, so an embedding that grew is compared on its first rows. Each rank reads
only the source bytes of the tensors in its own output files. Runs on: every rank, for its own files.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from distfinalize.adapter import recorded_options
from distfinalize.commands.hfdir import Header, Survey, WeightFile
from distfinalize.config import FinalizeConfig, LoraOptions
from distfinalize.pipeline import Prepared, embedding_names, prepare
from distfinalize.plan import TensorPlan, plan_tensors
from distfinalize.transform.cast import to_output
from distfinalize.transform.keymap import TIE_CANDIDATES

READ_BATCH_BYTES = 512 * 2**20  # source bytes read at once, like finalize's default
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


def open_source(
    src: Path, found: Survey, checkpoint: Path | None = None, tag: str | None = None, log_level: str = "info"
) -> Prepared:
    """Open SRC the way finalize does (metadata only). Runs on: every rank.

    The checkpoint: `checkpoint` / `tag`, else the one DEST's manifest records when it lies inside SRC, else the
    latest. Names are mapped through the source's config.json, else DEST's.
    """
    source = found.manifest.get("source") if found.manifest else None
    recorded = source.get("path") if isinstance(source, dict) else None
    if checkpoint is None and tag is None and isinstance(recorded, str):
        recorded_path = Path(recorded)
        if recorded_path.is_dir() and recorded_path.resolve().is_relative_to(src.resolve()):
            checkpoint = recorded_path
    # prepare() refuses an existing DEST; nothing is written, so it gets a name that is never created.
    phantom = Path(tempfile.gettempdir()) / f"distfinalize-verify-{uuid.uuid4().hex}"
    base_model = found.dest if (found.dest / "config.json").is_file() else None
    lora = LoraOptions()
    record = found.manifest.get("lora") if found.manifest else None
    if isinstance(record, dict):  # a LoRA finalize: redo it as recorded; DEST's weights are not the base model's
        lora, base_model = recorded_options(record)
    config = FinalizeConfig(src=src, dest=phantom, checkpoint=checkpoint, tag=tag, base_model=base_model,
                            log_level=log_level, lora=lora)  # fmt: skip
    return prepare(config)


def expectations(prepared: Prepared, dtype: torch.dtype | None, tied: bool) -> tuple[dict[str, Expectation], tuple]:
    """What each output tensor must equal, and the source tensors DEST may lack (heads dropped as tied). Pure."""
    embeddings = set(embedding_names(prepared))
    plans = plan_tensors(prepared.tensors, dtype, rope_heads=prepared.rope_heads, merges=prepared.merges)
    out = {p.name: Expectation(p, p.name in embeddings) for p in plans}
    absent = []
    if tied:
        for head, embed in TIE_CANDIDATES:
            if head in out and embed in out:
                out[embed] = replace(out[embed], tied=(*out[embed].tied, (out[head].key, head)))
                absent.append(head)
    return out, tuple(absent)


def compare(
    output: torch.Tensor, source: torch.Tensor, want: Expectation, lora: Sequence[torch.Tensor] = ()
) -> tuple[str | None, bool]:
    """Compare one output tensor with its source tensor, bit for bit after finalize's transforms (a merged LoRA
    weight: within the rounding of another device's matmul and one rounding to the output dtype). Pure.

    Returns (the problem, or None; whether only the first rows were compared).
    """
    if output.dtype != want.plan.dtype:
        return f"is {_dt(output.dtype)}, expected {_dt(want.plan.dtype)}", False
    expected = to_output(source, want.plan, CPU, lora)[want.plan.name]  # never resized or quantized here
    if want.plan.lora is not None and output.shape == expected.shape:
        return merge_problem(output, expected), False
    grown = False
    if tuple(output.shape) != tuple(expected.shape):
        rows = expected.shape[0] if expected.dim() else 0
        if not (want.rows_may_grow and expected.dim() and output.dim() == expected.dim()
                and output.shape[1:] == expected.shape[1:] and output.shape[0] > rows):  # fmt: skip
            return f"has shape {list(output.shape)}, the source's is {list(expected.shape)}", False
        output, grown = output[:rows], True
    count, first = differing_elements(output, expected)
    if count:
        part = f"of the first {expected.shape[0]} rows " if grown else ""
        return (f"differs from the source in {count} of {expected.numel()} element(s) {part}(first at flat index "
                f"{first})"), grown  # fmt: skip
    return None, grown


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


def compare_file(
    weight: WeightFile, header: Header, wanted: Mapping[str, Expectation], reader: Any, batch_bytes: int
) -> tuple[int, int, list[str]]:
    """Compare every tensor of one output file with the source. Returns (compared, grown, problems).

    Runs on: the rank that owns the file; reads only the source bytes of the file's tensors.
    """
    from safetensors import safe_open

    problems, compared, grown = [], 0, 0
    names = sorted(header.tensors)
    for name in names:
        if name not in wanted:
            problems.append(f"{weight.name}: {name!r} is not in the source checkpoint")
    present = [n for n in names if n in wanted]
    with safe_open(str(weight.path), framework="pt") as f:
        for batch in _batches(present, wanted, batch_bytes):
            keys = [k for n in batch for k in (*(k for k, _ in _sources(n, wanted[n])), *wanted[n].plan.source_keys)]
            data = reader.read(list(dict.fromkeys(keys)))
            for name in batch:
                want, output = wanted[name], f.get_tensor(name)
                lora = [data[k] for k in want.plan.source_keys[1:]]
                for key, label in _sources(name, want):
                    problem, was_grown = compare(output, data[key], want, lora)
                    if key == want.key:
                        compared, grown = compared + 1, grown + was_grown
                    if problem is not None:
                        problems.append(f"{weight.name}: {label} {problem}")
            del data
    return compared, grown, problems


def _sources(name: str, want: Expectation) -> list[tuple[str, str]]:
    """(source key, label) of every source tensor an output tensor must equal: its own, and tied heads."""
    return [(want.key, repr(name)), *((key, f"{head!r} (dropped as tied to {name!r})") for key, head in want.tied)]


def _batches(names: Sequence[str], wanted: Mapping[str, Expectation], limit: int) -> Iterator[list[str]]:
    batch, size = [], 0
    for name in names:
        want = wanted[name]
        nbytes = want.plan.source_nbytes * (1 + len(want.tied))
        if batch and size + nbytes > limit:
            yield batch
            batch, size = [], 0
        batch.append(name)
        size += nbytes
    if batch:
        yield batch


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
