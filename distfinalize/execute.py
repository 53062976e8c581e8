"""The write step of one rank: read its tensors, transform them on its device, write its files.

Reads go in batches of at most `read_batch_bytes` of source data, so memory stays bounded by the
batch (plus one tensor when a single tensor is larger), never by the file or the model.
Runs on: every rank, each for its own files.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from distfinalize.plan import FilePlan, Plan, TensorPlan
from distfinalize.sources import Source
from distfinalize.transform.cast import to_output
from distfinalize.write import SafetensorsWriter, layout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WrittenFile:
    """One finished output file, as reported to rank 0."""

    filename: str
    rank: int
    size: int
    tensors: int


def write_rank_files(
    plan: Plan,
    rank: int,
    source: Source,
    staging: Path,
    device: torch.device,
    read_batch_bytes: int,
    progress: bool = False,
) -> list[WrittenFile]:
    """Write every file the plan gives `rank`, with a progress bar when `progress`. Runs on: each rank."""
    files = plan.files_for(rank)
    reader = source.reader()
    done = []
    with tqdm(
        total=plan.bytes_for(rank),
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=f"rank {rank} writing",
        disable=not (progress and files),
        mininterval=1.0,
    ) as bar:
        for file in files:
            done.append(write_file(file, reader, staging, device, read_batch_bytes, bar))
    log.debug("wrote %d file(s)", len(done))
    return done


def write_file(
    file: FilePlan, reader, staging: Path, device: torch.device, read_batch_bytes: int, bar: tqdm
) -> WrittenFile:
    """Read, transform and write one output file."""
    path = staging / file.filename
    writer = SafetensorsWriter(path, layout([(t.name, t.shape, t.dtype) for t in file.tensors]))
    try:
        for batch in read_batches(file.tensors, read_batch_bytes):
            data = reader.read([t.source_key for t in batch])
            for t in batch:
                writer.write(t.name, to_output(data.pop(t.source_key), t, device))
                bar.update(t.nbytes)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return WrittenFile(file.filename, file.rank, os.path.getsize(path), len(file.tensors))


def read_batches(tensors: Sequence[TensorPlan], limit: int) -> Iterator[list[TensorPlan]]:
    """Consecutive groups of tensors whose source bytes stay within `limit` (a bigger tensor goes alone)."""
    batch: list[TensorPlan] = []
    size = 0
    for t in tensors:
        nbytes = t.source_nbytes
        if batch and size + nbytes > limit:
            yield batch
            batch, size = [], 0
        batch.append(t)
        size += nbytes
    if batch:
        yield batch
