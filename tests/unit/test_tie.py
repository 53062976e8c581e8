"""The tie check: pairing chunks by place, comparing them pair by pair, and combining ranks' answers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from distfinalize.prepare.tie import candidates, combine, paired_chunks, tie_share, tied_head
from distfinalize.sources import SourceChunk, TensorMeta
from distfinalize.sources.dcp import DcpSource


def chunk(key: str, file: str, row: int) -> SourceChunk:
    return SourceChunk(key, row // 4, file, int(file[2]), (row, 0), (4, 8), 128)


def test_chunks_pair_by_place() -> None:
    head = [chunk("h", "__0_0.distcp", 0), chunk("h", "__1_0.distcp", 4)]
    embed = [chunk("e", "__1_0.distcp", 4), chunk("e", "__0_0.distcp", 0)]
    assert paired_chunks(head, embed) == [(head[0], embed[1]), (head[1], embed[0])]
    assert paired_chunks(head, embed[:1]) is None  # different layouts


def test_under_exchange_a_pair_read_by_two_ranks_is_not_tied_and_nothing_is_read() -> None:
    head = [chunk("h", "__0_0.distcp", 0), chunk("h", "__1_0.distcp", 4)]
    swapped = [chunk("e", "__1_0.distcp", 0), chunk("e", "__0_0.distcp", 4)]  # same places, other files
    metas = (
        TensorMeta("h", "lm_head.weight", (8, 8), torch.float32),
        TensorMeta("e", "model.embed_tokens.weight", (8, 8), torch.float32),
    )
    assert tie_share([metas], {"h": head, "e": swapped}, None, rank=0, world_size=2) == [False]


class CountingReader:
    """The real DCP reader, counting the chunks it is asked to read and to give the stored CRC-32 of."""

    def __init__(self, reader) -> None:
        self.reader, self.chunks, self.crcs = reader, 0, 0

    def read_chunks(self, chunks):
        self.chunks += len(chunks)
        return self.reader.read_chunks(chunks)

    def stored_crcs(self, chunks):
        self.crcs += len(chunks)
        return self.reader.stored_crcs(chunks)


def counted_source(tmp_path: Path, embed: torch.Tensor, head: torch.Tensor) -> tuple[DcpSource, CountingReader]:
    dcp.save({"model.embed_tokens.weight": embed, "lm_head.weight": head}, checkpoint_id=str(tmp_path), no_dist=True)
    source = DcpSource(tmp_path)
    counting = CountingReader(source.reader())
    source.reader = lambda: counting
    return source, counting


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("same", [True, False])
def test_rank0_compares_chunk_pairs_of_a_dcp_checkpoint(tmp_path: Path, same: bool) -> None:
    embed = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))  # a record larger than TAIL_BYTES
    source, counting = counted_source(tmp_path, embed, embed.clone() if same else embed + 1)
    assert tied_head(candidates(source.tensors, {}), source) == ("lm_head.weight" if same else None)
    assert counting.crcs == 2  # the CRC-32 each record stores, from its last bytes
    assert counting.chunks == (2 if same else 0)  # equal CRCs: one chunk of each read; different: none


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_head_that_differs_only_in_the_sign_of_a_zero_is_not_tied(tmp_path: Path) -> None:
    embed = torch.zeros(64, 48)
    head = embed.clone()
    head[3, 5] = -0.0  # torch.equal takes it for 0.0; written once, lm_head's bytes would change
    source, _ = counted_source(tmp_path, embed, head)
    assert tied_head(candidates(source.tensors, {}), source) is None


def test_candidates_skip_merged_and_combine_needs_every_rank() -> None:
    head = TensorMeta("k1", "lm_head.weight", (8, 4), torch.float32)
    embed = TensorMeta("k2", "model.embed_tokens.weight", (8, 4), torch.float32)
    assert candidates([head, embed], {}) == [(head, embed)]
    assert candidates([head, embed], {"lm_head.weight": object()}) == []
    assert combine([(head, embed)], [[True], [True]]) == "lm_head.weight"
    assert combine([(head, embed)], [[True], [False]]) is None
