"""Train a tiny Llama with FSDP2 (`fully_shard`) on CPU/gloo and save DCP checkpoints.

    torchrun --nproc_per_node=2 examples/trainers/fsdp2.py OUT [--variant NAME ...] [--steps N]

Variants (each goes to OUT/NAME/, laid out like a training run:
OUT/NAME/config.json + OUT/NAME/checkpoints/checkpoint-<steps>/ holding the DCP files):
  tied-model, untied-model   model weights only (get_model_state_dict)
  tied-optim, untied-optim   {"model": ..., "optim": ...} (get_state_dict with the optimizer)
"""

from __future__ import annotations

from pathlib import Path

import common
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

VARIANTS = ("tied-model", "untied-model", "tied-optim", "untied-optim")


def train_and_save(out: Path, variant: str, steps: int, world: int) -> None:
    """Runs on: all ranks. Trains one variant and writes its checkpoint and references."""
    tie = variant.startswith("tied")
    mesh = init_device_mesh("cpu", (world,))
    model = common.build_model(tie)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    common.train(model, optim, steps)

    ckpt = out / variant / "checkpoints" / f"checkpoint-{steps}"
    if variant.endswith("optim"):
        model_sd, optim_sd = get_state_dict(model, optim)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(ckpt))
    else:
        dcp.save(get_model_state_dict(model), checkpoint_id=str(ckpt))

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        common.save_reference(out / variant, full, tie)
    dist.barrier()


def main() -> None:
    args = common.trainer_args(__doc__, VARIANTS)
    _, world = common.init_gloo()
    for variant in args.variant or ["untied-optim"]:
        train_and_save(args.out, variant, args.steps, world)
    common.finish()


if __name__ == "__main__":
    main()
