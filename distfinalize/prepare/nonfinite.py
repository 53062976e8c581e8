"""--quantize-skip-nonfinite: find the weights --quantize would quantize that hold NaN or Inf, before the plan.

Without the flag such a weight is an error when its rank quantizes it (transform.quantize.check_finite). With it,
the weight is written unquantized, the whole tensor in the output dtype, and listed as ignored in config.json's
quantization block: the output formats (compressed-tensors, transformers fp8, torchao) leave whole modules
unquantized, never single rows. Which weights those are changes the plan (their dtypes and sizes), so they are
found first: each rank reads a byte-balanced share of the weights (with `--strategy exchange`, the chunks of the
files it reads) and checks each with one isfinite().all() reduction; one gather gives every rank the same set.

Runs on: all ranks, one step, only with the flag (and not for --dry-run, which reads no weights).
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from distfinalize.config import FinalizeConfig
from distfinalize.dist.context import DistContext
from distfinalize.logs import log_rank0
from distfinalize.prepare.chunks import Checkpoint, key_parts, share_chunks
from distfinalize.sources import TensorMeta
from distfinalize.transform.quant.selection import quantized_tensors

if TYPE_CHECKING:
    from distfinalize.prepare.prepared import Prepared

log = logging.getLogger(__name__)


def skip_nonfinite(
    config: FinalizeConfig, prepared: Prepared, ctx: DistContext, checkpoint: Checkpoint | None = None
) -> Prepared:
    """`prepared` with the quantizable weights that hold NaN or Inf in `nonfinite` (left unquantized by the plan,
    config.json and the card); each rank gets the chunk lists of its share from rank 0 first (`checkpoint`, see
    chunks.py; with `--strategy exchange` it holds those of the files it reads already). Runs on: all ranks."""
    if config.quantize is None or not config.quantize_skip_nonfinite:
        return prepared
    if config.dry_run:
        log_rank0(log, "--dry-run reads no weights: weights holding NaN or Inf are not looked for")
        return prepared
    from distfinalize.transform.quant.recipes import get_recipe

    recipe = get_recipe(config.quantize)
    cast = prepared.dtype if recipe.casts_first else None  # what the recipe quantizes: the weight cast first
    wanted = quantized_tensors(config, prepared)
    tensors = [t for t in prepared.tensors if t.name in wanted]
    strategy = config.strategy if hasattr(prepared.source, "chunks") else "read"
    files = None
    if checkpoint is not None and strategy != "exchange":
        keys = [[t.key for t in mine] for mine in owners(tensors, ctx.world_size)]
        share_chunks(ctx, checkpoint, "non-finite chunk tables", key_parts(keys))
    elif checkpoint is not None and checkpoint.source is not None:
        files = checkpoint.source.files()
    shares = ctx.run_step(
        "non-finite scan",
        lambda: scan_share(
            prepared.source, tensors, ctx.rank, ctx.world_size, cast, config.read_batch_bytes, strategy, files
        ),
        collect="all",
    )
    found = frozenset(name for share in shares for name in share)
    if found:
        log_rank0(
            log,
            "%d weight(s) hold NaN or Inf and are written unquantized (--quantize-skip-nonfinite): %s",
            len(found),
            ", ".join(sorted(found)),
            level=logging.WARNING,
        )
    return replace(prepared, nonfinite=found)


def scan_share(
    source,
    tensors: Sequence[TensorMeta],
    rank: int,
    world_size: int,
    cast: torch.dtype | None,
    batch_bytes: int,
    strategy: str = "read",
    files: Mapping[str, int | None] | None = None,
) -> list[str]:
    """Names of the weights in this rank's share that hold NaN or Inf (in `cast` when given). With `exchange`,
    `files` names every data file for the readers when this rank holds only the chunks of its own files.
    Runs on: every rank."""
    reader = source.reader()
    if strategy == "exchange":  # node-local files: check the chunks of the files this rank reads
        from distfinalize.write.exchange import assign_readers

        chunks = source.chunks()
        readers = assign_readers(files or {c.file: c.writer for t in tensors for c in chunks[t.key]}, world_size)
        bad = []
        for t in tensors:
            mine = [c for c in chunks.get(t.key, ()) if readers[c.file] == rank]
            if mine and any(not finite(part, cast) for part in reader.read_chunks(mine)):
                bad.append(t.name)
        return bad
    bad = []
    for batch in batches(share(tensors, rank, world_size), batch_bytes):
        data = reader.read([t.key for t in batch])
        bad += [t.name for t in batch if not finite(data[t.key], cast)]
    return bad


def finite(tensor: torch.Tensor, cast: torch.dtype | None) -> bool:
    """One isfinite().all() reduction (on the tensor cast to `cast` when given)."""
    return bool(torch.isfinite(tensor.to(cast) if cast is not None else tensor).all())


def share(tensors: Sequence[TensorMeta], rank: int, world_size: int) -> list[TensorMeta]:
    """This rank's byte-balanced share (see `owners`). Pure."""
    return owners(tensors, world_size)[rank]


def owners(tensors: Sequence[TensorMeta], world_size: int) -> list[list[TensorMeta]]:
    """Every rank's byte-balanced share: largest first, each to the least loaded rank (ties: the lowest). Pure."""
    loads = [(0, rank) for rank in range(world_size)]  # a heap: (bytes so far, rank)
    out: list[list[TensorMeta]] = [[] for _ in range(world_size)]
    for t in sorted(tensors, key=lambda t: (-t.nbytes, t.name)):
        load, owner = heapq.heappop(loads)
        out[owner].append(t)
        heapq.heappush(loads, (load + t.nbytes, owner))
    return out


def batches(tensors: Sequence[TensorMeta], batch_bytes: int) -> list[list[TensorMeta]]:
    """Consecutive groups of at most `batch_bytes` (a larger tensor alone). Pure."""
    out: list[list[TensorMeta]] = []
    size = 0
    for t in tensors:
        if not out or size + t.nbytes > batch_bytes:
            out.append([])
            size = 0
        out[-1].append(t)
        size += t.nbytes
    return out
