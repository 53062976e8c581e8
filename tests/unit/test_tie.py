"""The tie check's pure parts: pairing chunks by place for --strategy exchange, and combining ranks' answers."""

from __future__ import annotations

import torch

from distfinalize.sources import SourceChunk, TensorMeta
from distfinalize.tie import candidates, combine, matching_chunks


def chunk(key: str, file: str, row: int) -> SourceChunk:
    return SourceChunk(key, row // 4, file, int(file[2]), (row, 0), (4, 8), 128)


def test_chunks_pair_by_place_when_one_rank_reads_both() -> None:
    head = [chunk("h", "__0_0.distcp", 0), chunk("h", "__1_0.distcp", 4)]
    embed = [chunk("e", "__1_0.distcp", 4), chunk("e", "__0_0.distcp", 0)]
    readers = {"__0_0.distcp": 0, "__1_0.distcp": 1}
    assert matching_chunks(head, embed, readers) == [(head[0], embed[1]), (head[1], embed[0])]
    swapped = [chunk("e", "__1_0.distcp", 0), chunk("e", "__0_0.distcp", 4)]
    assert matching_chunks(head, swapped, readers) is None  # a pair spans two readers: not comparable here
    assert matching_chunks(head, embed[:1], readers) is None  # different layouts


def test_candidates_skip_merged_and_combine_needs_every_rank() -> None:
    head = TensorMeta("k1", "lm_head.weight", (8, 4), torch.float32)
    embed = TensorMeta("k2", "model.embed_tokens.weight", (8, 4), torch.float32)
    assert candidates([head, embed], {}) == [(head, embed)]
    assert candidates([head, embed], {"lm_head.weight": object()}) == []
    assert combine([(head, embed)], [[True], [True]]) == "lm_head.weight"
    assert combine([(head, embed)], [[True], [False]]) is None
