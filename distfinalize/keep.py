"""--keep-checkpoint: one resumable checkpoint inside DEST, with symlinks from the root; no byte stored twice.

DEST/checkpoints/checkpoint-N/ holds the weights, the index, config.json and manifest.json; with
--keep-optimizer also optimizer/, a DCP directory of the optimizer state alone. The optimizer is copied
chunk by chunk as byte ranges of the source .distcp files (each DCP chunk is a self-contained record), into
new files holding only optimizer chunks, and a new .metadata pointing at them: bit-exact, memory-bounded,
loadable by torch.distributed.checkpoint. Scheduler, dataloader, RNG and trainer state are dropped.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from torch.distributed.checkpoint.metadata import Metadata

from distfinalize.artifacts.jsonfile import write_json
from distfinalize.errors import SourceError

OPTIMIZER_CONTAINERS = frozenset({"optim", "optimizer", "optimizers", "optimizer_state", "optim_state"})
ACCELERATE_OPTIMIZER_DIR = "optimizer_0"
COPY_BLOCK = 64 * 2**20


@dataclass(frozen=True)
class ByteRange:
    """One chunk: `length` bytes at `src_offset` of a source file go to `dst_offset` of the new file."""

    src_offset: int
    dst_offset: int
    length: int


@dataclass(frozen=True)
class FileCopy:
    """One source .distcp file and the optimizer chunks it contributes to its copy."""

    source: str
    ranges: tuple[ByteRange, ...]


@dataclass(frozen=True)
class OptimizerCopy:
    """The whole copy: source dir, per-file ranges, and the metadata of the new DCP directory."""

    source_dir: Path
    files: tuple[FileCopy, ...]
    metadata: Metadata

    def files_for(self, rank: int, world_size: int) -> tuple[FileCopy, ...]:
        return self.files[rank::world_size]


def checkpoint_dir_name(step: int | None) -> str:
    return f"checkpoint-{step if step is not None else 0}"


def optimizer_source(model_dir: Path, metadata: Metadata) -> tuple[Path, Metadata, bool]:
    """(dir, its metadata, whether every entry is optimizer state) of the checkpoint's optimizer state."""
    from distfinalize.sources.dcp import read_metadata

    sibling = model_dir.parent / ACCELERATE_OPTIMIZER_DIR
    if (sibling / ".metadata").is_file():
        return sibling, read_metadata(sibling), True
    return model_dir, metadata, False


def plan_optimizer_copy(source_dir: Path, metadata: Metadata, whole: bool) -> OptimizerCopy:
    """Which byte ranges make up the optimizer state, and the metadata of the copy. Pure (given metadata)."""
    paths = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}

    def is_optimizer(key: str) -> bool:
        path = paths.get(key)
        head = path[0] if isinstance(path, tuple) and path else key.split(".", 1)[0]
        return whole or head in OPTIMIZER_CONTAINERS

    keys = [k for k in metadata.state_dict_metadata if is_optimizer(k)]
    if not keys:
        raise SourceError(
            "--keep-optimizer: the checkpoint holds no optimizer state",
            where=source_dir,
            hint="save it with get_state_dict(model, optimizer), or drop --keep-optimizer",
        )
    wanted = set(keys)
    by_file: dict[str, list[tuple[object, object]]] = {}
    for index, info in (metadata.storage_data or {}).items():
        if index.fqn in wanted:
            by_file.setdefault(info.relative_path, []).append((index, info))
    files, storage = [], {}
    for name in sorted(by_file):
        offset, ranges = 0, []
        for index, info in sorted(by_file[name], key=lambda e: e[1].offset):
            ranges.append(ByteRange(info.offset, offset, info.length))
            storage[index] = replace(info, offset=offset)
            offset += info.length
        files.append(FileCopy(name, tuple(ranges)))
    new = Metadata(
        state_dict_metadata={k: metadata.state_dict_metadata[k] for k in keys},
        planner_data={k: v for k, v in paths.items() if k in wanted} or None,
        storage_data=storage,
    )
    return OptimizerCopy(source_dir, tuple(files), new)


def copy_optimizer_files(copy: OptimizerCopy, files: Sequence[FileCopy], dest_dir: Path) -> int:
    """Copy the given files' optimizer chunks into `dest_dir`, fsynced. Returns bytes copied. Runs on: each rank."""
    total = 0
    for file in files:
        src_path, dst_path = copy.source_dir / file.source, dest_dir / file.source
        try:
            with open(src_path, "rb", buffering=0) as src, open(dst_path, "wb") as dst:
                for r in file.ranges:
                    src.seek(r.src_offset)
                    left = r.length
                    while left:
                        block = src.read(min(COPY_BLOCK, left))
                        if not block:
                            raise SourceError(
                                "optimizer file is truncated",
                                where=src_path,
                                hint="the checkpoint is incomplete; drop --keep-optimizer",
                            )
                        dst.write(block)
                        left -= len(block)
                    total += r.length
                dst.flush()
                os.fsync(dst.fileno())
        except OSError as exc:
            raise SourceError("cannot copy optimizer state", where=src_path, hint=exc.strerror) from exc
    return total


def write_optimizer_metadata(copy: OptimizerCopy, dest_dir: Path) -> None:
    """The new .metadata. Runs on: rank 0, after every rank copied its files."""
    with open(dest_dir / ".metadata", "wb") as f:
        pickle.dump(copy.metadata, f)
        f.flush()
        os.fsync(f.fileno())


def link_into_root(root: Path, kept: Path, names: Sequence[str]) -> None:
    """Relative symlinks at the DEST root to the kept checkpoint's files. Runs on: rank 0."""
    for name in names:
        os.symlink(os.path.relpath(kept / name, root), root / name)


def write_manifest(kept: Path, entries: Mapping[str, object]) -> Path:
    """manifest.json: what was kept, where it came from, and what was dropped."""
    return write_json(kept / "manifest.json", dict(entries))
