"""Rewrite a trained FSDP2 run's checkpoint with NaN and Inf in some rows of one weight, the way a diverged run
saves it: the checkpoint is loaded into the same sharded model, the values are set in the rank's own shard, and
the model is saved again with DCP.

    torchrun --nproc_per_node=2 nan_checkpoint.py RUN OUT WEIGHT

OUT gets RUN's config.json and tokenizer, checkpoints/checkpoint-3/ (DCP) and WEIGHT's full tensor as
`<WEIGHT>.pt` (rank 0). Rows 1 (all NaN), 3 (first 5 NaN) and element [2, 0] (+Inf): 166 non-finite values when
the weight has 160 columns. Runs on: all ranks.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "trainers"))

import common
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

CKPT = Path("checkpoints") / "checkpoint-3"


def main() -> None:
    run, out, weight = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    rank, world = common.init_gloo()
    mesh = init_device_mesh("cpu", (world,))
    model = common.build_model(tie=False)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    state = get_model_state_dict(model)
    dcp.load(state, checkpoint_id=str(run / CKPT))
    set_model_state_dict(model, state)
    with torch.no_grad():
        local = dict(model.named_parameters())[weight].to_local()  # Shard(0): rank 0 holds the first rows
        if rank == 0:
            local[1] = float("nan")
            local[3, :5] = float("nan")
            local[2, 0] = float("inf")
    dcp.save(get_model_state_dict(model), checkpoint_id=str(out / CKPT))
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        for path in run.iterdir():
            if path.is_file() and (path.name == "config.json" or path.name.startswith("tokenizer")):
                shutil.copy(path, out / path.name)
        torch.save(full[weight].clone(), out / f"{weight}.pt")
    dist.barrier()
    common.finish()


if __name__ == "__main__":
    main()
