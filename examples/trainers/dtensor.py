"""Save a tiny Llama as DTensors with plain `torch.distributed.checkpoint.save`, uneven and mixed placements.

    torchrun --nproc_per_node=3 examples/trainers/dtensor.py OUT [--tie | --identical-head]

Matrices alternate between row (Shard(0)) and column (Shard(1)) sharding, norms are replicated; with 3
ranks every split is uneven (256, 64 and 160 are not multiples of 3). The state dict is flat (no "model"
container) and carries a non-tensor `train_state` entry that finalize must skip. Writes OUT/dtensor/ with
config.json, reference.pt, reference_logits.pt and checkpoint-0/ (the DCP files). With --identical-head,
config.json says untied but lm_head holds embed_tokens' data, sharded like it (the tie check must find it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import common
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor


def placement(index: int, tensor: torch.Tensor) -> list:
    """Row, column or replicated, in turn for matrices; replicated for vectors."""
    if tensor.dim() < 2:
        return [Replicate()]
    return [Shard(0)] if index % 2 == 0 else [Shard(1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--tie", action="store_true")
    parser.add_argument("--identical-head", action="store_true")
    args = parser.parse_args()
    rank, world = common.init_gloo()
    mesh = init_device_mesh("cpu", (world,))
    model = common.build_model(args.tie)
    if args.identical_head:
        with torch.no_grad():
            model.lm_head.weight.copy_(model.model.embed_tokens.weight)
    full = model.state_dict()
    embed_placement = placement(0, full["model.embed_tokens.weight"])
    state: dict[str, object] = {}
    for i, (name, tensor) in enumerate(full.items()):
        if args.tie and name == "lm_head.weight":
            continue  # saved once, as transformers does
        place = embed_placement if args.identical_head and name == "lm_head.weight" else placement(i, tensor)
        state[name] = distribute_tensor(tensor.detach().clone(), mesh, place)
    state["train_state"] = {"step": 0, "tokens_seen": 0}
    out = args.out / "dtensor"
    dcp.save(state, checkpoint_id=str(out / "checkpoint-0"))
    if rank == 0:
        common.save_reference(out, full, args.tie)
    dist.barrier()
    common.finish()


if __name__ == "__main__":
    main()
