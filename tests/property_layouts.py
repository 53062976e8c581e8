"""Property test, run under torchrun (3 ranks, gloo): random tensors, dtypes and DTensor chunk layouts
(row, column, uneven, replicated), saved with dcp.save, finalized in the same job, compared bit for bit.

    torchrun --nproc_per_node=3 tests/property_layouts.py WORKDIR [--examples N]

Hypothesis runs derandomized, so every rank draws the same examples; a failure raises on every rank
(DistContext.run_step) and the process exits non-zero after printing the falsifying example.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from distfinalize.config import FinalizeConfig
from distfinalize.dist.context import DistContext
from distfinalize.logs import setup_logging
from distfinalize.pipeline import run

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.int8]


@st.composite
def layouts(draw: st.DrawFn) -> list[tuple[str, tuple[int, ...], torch.dtype, int | None]]:
    """(name, shape, dtype, shard dim or None for replicated) for 1-6 tensors."""
    out = []
    for i in range(draw(st.integers(1, 6))):
        shape = tuple(draw(st.lists(st.integers(1, 13), min_size=1, max_size=3)))
        dim = draw(st.one_of(st.none(), st.integers(0, len(shape) - 1)))
        out.append(
            (
                f"block{i}.{draw(st.sampled_from(['weight', 'bias', 'scale']))}",
                shape,
                draw(st.sampled_from(DTYPES)),
                dim,
            )
        )
    return out


def full_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=gen) * 3).to(dtype)
    return torch.randint(-100, 100, shape, generator=gen).to(dtype)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("work", type=Path)
    parser.add_argument("--examples", type=int, default=20)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    ctx = DistContext.from_env("cpu", 120)
    setup_logging("error", ctx.rank, ctx.world_size)
    counter = iter(range(10**6))

    @settings(
        max_examples=args.examples,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(layout=layouts(), nested=st.booleans(), shard_kib=st.integers(1, 8))
    def check(layout, nested: bool, shard_kib: int) -> None:
        case = args.work / f"case{next(counter)}"
        full = {name: full_tensor(shape, dtype, seed) for seed, (name, shape, dtype, _) in enumerate(layout)}
        state = {
            name: distribute_tensor(full[name].clone(), mesh, [Shard(d) if d is not None else Replicate()])
            for name, _, _, d in layout
        }
        dcp.save({"model": state, "step": 7} if nested else state, checkpoint_id=str(case / "ckpt"))
        dest = case / "out"
        config = FinalizeConfig(
            src=case / "ckpt", dest=dest, max_shard_size=shard_kib * 1024, log_level="error", tensors_only=True
        )
        run(config, ctx)
        if dist.get_rank() == 0:
            written = {}
            for path in dest.glob("*.safetensors"):
                written.update(load_file(path))
            assert written.keys() == full.keys(), (sorted(written), sorted(full))
            for name, tensor in full.items():
                assert written[name].dtype == tensor.dtype and torch.equal(written[name], tensor), name
            shutil.rmtree(case)
        dist.barrier()

    try:
        check()
    except Exception:
        dist.destroy_process_group()
        raise
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
