"""The tie check: is the output embedding (lm_head) exactly the input embedding's data, so that it is written
once, as tied embeddings? Asked only when both are in the checkpoint with the same shape and dtype, and neither
gets a LoRA merge (the merged weights would differ).

With `--strategy read`, rank 0 compares both tensors. Chunk pairs are first told apart by the CRC-32s their records
store (a few KB read), so an untied model reads no tensor data. With `exchange` (node-local disks, where rank 0 may
not hold the files), each rank compares the chunk pairs in the files it reads, and the answers are combined: tied
only when every chunk pair is equal. Chunk pairs that do not sit at the same place in the same reader's files cannot
be compared without moving them, so the answer is then "not tied" (lm_head kept: correct output, one copy more).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence

import torch

from distfinalize.sources import SourceChunk, TensorMeta
from distfinalize.sources.formats import format_of
from distfinalize.transform.keymap import tie_candidates
from distfinalize.write.exchange import assign_readers

log = logging.getLogger(__name__)

COMPARE_BYTES = 16 * 2**20  # rows of each tensor compared at once when the chunks do not pair up


def candidates(tensors: Sequence[TensorMeta], merged: Mapping[str, object]) -> list[tuple[TensorMeta, TensorMeta]]:
    """(lm_head, embedding) pairs to compare: same shape and dtype, no LoRA merge into either. Pure."""
    return [(h, e) for h, e in tie_candidates(tensors) if h.name not in merged and e.name not in merged]


def tied_head(pairs: Sequence[tuple[TensorMeta, TensorMeta]], source) -> str | None:
    """The lm_head name to drop when it holds exactly the embedding's data. Runs on: rank 0 (reads both)."""
    reader = source.reader()
    chunks = source.chunks() if format_of(source).chunked else None
    for head, embed in pairs:
        if identical(head, embed, reader, chunks):
            log.info("%s is identical to %s: writing it once, as tied embeddings", head.name, embed.name)
            return head.name
    return None


def identical(head: TensorMeta, embed: TensorMeta, reader, chunks: Mapping[str, Sequence[SourceChunk]] | None) -> bool:
    """Whether both hold the same bytes: chunk pair by chunk pair when both are stored at the same places (DCP,
    `pairs_equal`), stopping at the first difference; else row block by row block (COMPARE_BYTES of each),
    stopping alike."""
    both = chunks is not None and head.key in chunks and embed.key in chunks  # not from --base-model
    paired = paired_chunks(chunks[head.key], chunks[embed.key]) if both else None
    if paired is None:
        return all(same_bytes(*pair) for pair in row_blocks(reader, head, embed))  # stops at the first False
    return pairs_equal(reader, paired)


def pairs_equal(reader, pairs: Sequence[tuple[SourceChunk, SourceChunk]]) -> bool:
    """Whether every chunk pair holds the same bytes, pair by pair, stopping at the first difference: first the
    CRC-32s their records store (read from each record's last bytes), then, when those are equal or do not tell,
    the chunks themselves (read whole and verified). An untied model costs a few KB of reads."""
    for pair in pairs:
        crcs = reader.stored_crcs(pair)
        if None not in crcs and crcs[0] != crcs[1]:
            return False
        if not same_bytes(*reader.read_chunks(pair)):
            return False
    return True


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors hold the same bytes: writing one for both changes nothing (`torch.equal` would take
    -0.0 for 0.0, and never a NaN for itself). Pure."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def row_blocks(reader, head: TensorMeta, embed: TensorMeta) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The same rows of both tensors, COMPARE_BYTES of each at a time (whole when 0-d)."""
    if not head.shape:
        data = reader.read([head.key, embed.key])
        yield data[head.key], data[embed.key]
        return
    rows = head.shape[0]
    step = max(1, COMPARE_BYTES // max(1, head.nbytes // max(rows, 1)))
    for lo in range(0, rows, step):
        hi = min(lo + step, rows)
        yield reader.read_rows(head.key, lo, hi), reader.read_rows(embed.key, lo, hi)


def tie_share(
    pairs: Sequence[tuple[TensorMeta, TensorMeta]],
    chunks: Mapping[str, Sequence[SourceChunk]],
    reader,
    rank: int,
    world_size: int,
    files: Mapping[str, int | None] | None = None,
) -> list[bool]:
    """Per pair: whether every chunk pair this rank reads is equal (and comparable here). `chunks` may hold only
    the chunks of the files this rank reads, when `files` names every data file (and its writer) for the readers:
    pairs stored alike are then paired within each rank's files. Runs on: every rank, reading only chunks of the
    files `exchange` gives it."""
    readers = assign_readers(files or {c.file: c.writer for cs in chunks.values() for c in cs}, world_size)
    verdicts = []
    for head, embed in pairs:
        matched = paired_chunks(chunks.get(head.key, ()), chunks.get(embed.key, ()))
        if matched is None or any(readers[h.file] != readers[e.file] for h, e in matched):
            verdicts.append(False)
            continue
        verdicts.append(pairs_equal(reader, [(h, e) for h, e in matched if readers[h.file] == rank]))
    return verdicts


def paired_chunks(
    head: Sequence[SourceChunk], embed: Sequence[SourceChunk]
) -> list[tuple[SourceChunk, SourceChunk]] | None:
    """The head's and the embedding's chunks paired by place (same offsets and sizes), or None when they are
    stored differently. Pure."""
    by_place = {(c.offsets, c.sizes): c for c in embed}
    if len(by_place) != len(head) or any((c.offsets, c.sizes) not in by_place for c in head):
        return None
    return [(c, by_place[(c.offsets, c.sizes)]) for c in head]


def combine(pairs: Sequence[tuple[TensorMeta, TensorMeta]], shares: Sequence[Sequence[bool]]) -> str | None:
    """The lm_head to drop: the first pair every rank found equal. Pure."""
    for i, (head, embed) in enumerate(pairs):
        if all(share[i] for share in shares):
            log.info("%s is identical to %s: writing it once, as tied embeddings", head.name, embed.name)
            return head.name
    return None
