"""The write step of one rank: read its tensors, transform them on its device, write its files.

Reads go in batches of at most `read_batch_bytes` of source data, so memory stays bounded by the
batch (plus one tensor when a single tensor is larger), never by the file or the model. Tensors are
written in file order, so each file's sha256 is computed as it is written. A finished file leaves a
record in the staging dir's `.progress/`; `--resume` reuses files whose record and checksum still match.
Runs on: every rank, each for its own files.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from distfinalize.errors import DestinationError
from distfinalize.plan import FilePlan, Plan, TensorPlan
from distfinalize.sources import Source, TensorReader
from distfinalize.transform.cast import to_output
from distfinalize.write import SafetensorsWriter, file_sha256, layout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WrittenFile:
    """One finished output file, as reported to rank 0."""

    filename: str
    rank: int
    size: int
    tensors: int
    sha256: str
    reused: bool = False


def write_rank_files(
    plan: Plan,
    rank: int,
    source: Source,
    directory: Path,
    device: torch.device,
    read_batch_bytes: int,
    progress: bool = False,
    progress_dir: Path | None = None,
    resume: bool = False,
) -> list[WrittenFile]:
    """Write every file the plan gives `rank` into `directory` (bar when `progress`). Runs on: each rank."""
    files = plan.files_for(rank)
    reader = source.reader()
    done = []
    with tqdm(total=plan.bytes_for(rank), unit="B", unit_scale=True, unit_divisor=1024,
              desc=f"rank {rank} writing", disable=not (progress and files), mininterval=1.0) as bar:  # fmt: skip
        for file in files:
            finished = reusable(file, directory, progress_dir) if resume else None
            if finished is None:
                finished = write_file(file, reader, directory, device, read_batch_bytes, bar)
                if progress_dir is not None:
                    record_progress(progress_dir, finished)
            else:
                log.info("resume: reusing %s (size and sha256 match)", file.filename)
                bar.update(file.nbytes)
            done.append(finished)
    log.debug("wrote %d file(s)", len(done))
    return done


def write_file(
    file: FilePlan, reader: TensorReader, directory: Path, device: torch.device, read_batch_bytes: int, bar: tqdm
) -> WrittenFile:
    """Read, transform and write one output file, in file order."""
    path = directory / file.filename
    file_layout = layout([(name, shape, dtype) for t in file.tensors for name, (shape, dtype) in t.outputs.items()])
    ordered = sorted(file.tensors, key=lambda t: min(file_layout.slots[name].start for name in t.outputs))
    try:
        writer = SafetensorsWriter(path, file_layout)
        try:
            for batch in read_batches(ordered, read_batch_bytes):
                data = reader.read([key for t in batch for key in t.source_keys])
                for t in batch:
                    inputs = [data.pop(key) for key in t.source_keys]
                    for name, tensor in to_output(inputs[0], t, device, inputs[1:]).items():
                        writer.write(name, tensor)
                    bar.update(t.nbytes)
        except BaseException:
            writer.abort()
            raise
        digest = writer.close()
    except OSError as exc:
        raise DestinationError(f"cannot write {file.filename}", where=path.parent,
                               hint=f"{exc.strerror or exc}; free space or choose another DEST") from exc  # fmt: skip
    return WrittenFile(file.filename, file.rank, os.path.getsize(path), len(file.tensors), digest)


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


def record_progress(progress_dir: Path, written: WrittenFile) -> None:
    """Atomically record a finished file (written after the file itself was fsynced)."""
    tmp = progress_dir / f"{written.filename}.json.tmp"
    tmp.write_text(json.dumps(asdict(written)))
    os.replace(tmp, progress_dir / f"{written.filename}.json")


def reusable(file: FilePlan, directory: Path, progress_dir: Path | None) -> WrittenFile | None:
    """The record of a file an interrupted run finished, when the file on disk still matches it."""
    if progress_dir is None:
        return None
    record_path, path = progress_dir / f"{file.filename}.json", directory / file.filename
    try:
        record = WrittenFile(**json.loads(record_path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
    if not path.is_file() or path.stat().st_size != record.size or record.tensors != len(file.tensors):
        return None
    if file_sha256(path) != record.sha256:
        log.warning("resume: %s does not match its record; writing it again", file.filename)
        return None
    return WrittenFile(record.filename, file.rank, record.size, record.tensors, record.sha256, reused=True)
