"""`scatter_object`: each rank receives exactly its own part of rank 0's list, whatever the parts' sizes (one much
larger than the rest, one empty), with more ranks than rank 0's send window. Marked `dist`: real processes, real
gloo under torchrun."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from support import torchrun

pytestmark = pytest.mark.dist

SCRIPT = """
import os
import torch.distributed as dist
from distfinalize.dist import group

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
group.SCATTER_WINDOW = 2  # fewer than the ranks: rank 0 waits for early sends before it pickles the later parts
parts = [{"rank": r, "data": bytes([r]) * (r * 300_000)} for r in range(world)]
parts[2] = ()
got = group.scatter_object(parts if rank == 0 else None, world, rank == 0)
assert got == parts[rank], (rank, type(got))
dist.barrier()
print(f"rank {rank} ok", flush=True)
dist.destroy_process_group()
"""


def test_each_rank_gets_its_own_part(tmp_path: Path) -> None:
    script = tmp_path / "scatter.py"
    script.write_text(SCRIPT)
    result = torchrun(5, script)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(re.findall(r"rank \d ok", result.stdout)) == [f"rank {r} ok" for r in range(5)]
