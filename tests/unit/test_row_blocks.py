"""How a tensor larger than the read batch is cut into blocks of rows (write/blocks.py row_blocks). Pure."""

from __future__ import annotations

from distfinalize.write.blocks import row_blocks


def test_any_row_may_end_a_block_when_the_source_reads_rows_exactly() -> None:
    assert row_blocks(10, 100, 300, 1, None) == [(0, 3), (3, 6), (6, 9), (9, 10)]


def test_blocks_keep_row_groups_together() -> None:
    """fp8-block tiles: 128 rows share a scale row; a block smaller than a tile still takes a whole tile."""
    assert row_blocks(300, 10, 1500, 128, None) == [(0, 128), (128, 256), (256, 300)]
    assert row_blocks(300, 10, 2600, 128, None) == [(0, 256), (256, 300)]
    assert row_blocks(300, 10, 500, 128, None) == [(0, 128), (128, 256), (256, 300)]  # 50 rows fit: a tile each


def test_blocks_end_where_stored_chunks_start() -> None:
    """A DCP chunk is read whole: blocks take whole chunks, several when they fit, a big one alone."""
    cuts = [0, 4, 8, 12, 16]
    assert row_blocks(20, 100, 800, 1, cuts) == [(0, 8), (8, 16), (16, 20)]
    assert row_blocks(20, 100, 300, 1, cuts) == [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20)]
    assert row_blocks(20, 100, 300, 8, cuts) == [(0, 8), (8, 16), (16, 20)]  # chunk and group ends both
