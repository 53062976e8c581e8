"""Save DCP checkpoints of the kinds the session fixtures do not make, for the metadata loader's tests.

    torchrun --nproc_per_node=2 tests/trust/dcp_saves.py OUT

OUT/fsdp1/: FSDP1 SHARDED_STATE_DICT (ShardedTensor) model + optimizer. OUT/values/: a nested state dict with
every kind of value a state dict holds (dtypes, scalars, empty and non-contiguous tensors, ints, floats, strings,
None, lists, tuples, OrderedDict, BytesIO), saved with a Path as checkpoint id. OUT/no-dist/: rank 0 alone,
`no_dist=True`. Runs on: every rank.
"""

from __future__ import annotations

import io
import os
import sys
from collections import OrderedDict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.fsdp import FullyShardedDataParallel, StateDictType


def values() -> dict:
    """Every kind of value a state dict holds (the same on every rank: DCP dedupes replicated entries)."""
    dtypes = (torch.bfloat16, torch.float16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.float64)
    return {
        "model": {
            "w": torch.ones(3, 2),
            "t": torch.ones(4, 4).t(),
            "empty": torch.empty(0, 3),
            "scalar": torch.tensor(2.0),
        },
        "optim": {
            "state": {"w": {"step": torch.tensor(1.0), "exp_avg": torch.zeros(3, 2)}},
            "param_groups": [{"lr": 0.01, "betas": (0.9, 0.99), "params": ["w"], "name": None}],
        },
        "extra": {
            "i": 3,
            "f": 1.5,
            "s": "x",
            "n": None,
            "list": [1, 2, torch.arange(3)],
            "tuple": (1, "a"),
            "bytes": io.BytesIO(b"abc"),
            "ordered": OrderedDict(a=torch.zeros(1)),
            **{str(d).removeprefix("torch."): torch.ones(2, dtype=d) for d in dtypes},
            "float8": torch.ones(2).to(torch.float8_e4m3fn),
        },
    }


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = FullyShardedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)),
        device_id=torch.device("cpu"),
        use_orig_params=True,
    )
    optim = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    optim.step()
    with FullyShardedDataParallel.state_dict_type(model, StateDictType.SHARDED_STATE_DICT):
        state = {"model": model.state_dict(), "optim": FullyShardedDataParallel.optim_state_dict(model, optim)}
        dcp.save(state, checkpoint_id=str(out / "fsdp1"))
    dcp.save(values(), checkpoint_id=out / "values")
    if rank == 0:
        dcp.save({"w": torch.ones(2)}, checkpoint_id=str(out / "no-dist"), no_dist=True)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # gloo's threads can abort a finished rank at interpreter teardown (examples/trainers/common.py)


if __name__ == "__main__":
    main()
