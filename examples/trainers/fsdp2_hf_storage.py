"""Train a tiny Llama with FSDP2 (`fully_shard`) on CPU/gloo and save it with DCP's HuggingFaceStorageWriter.

    torchrun --nproc_per_node=2 examples/trainers/fsdp2_hf_storage.py OUT [--variant NAME ...] [--steps N]

Variants (each to OUT/NAME/: config.json, tokenizer and references, and checkpoint/step-<steps>/ holding the save):
  sharded        save_distributed=True: each rank writes shard-<rank>-model-00001-of-00001.safetensors, no index
  consolidated   save_distributed=True, enable_consolidation=True: the shards under sharded/, and whole tensors
                 in model-0000i-of-0000N.safetensors + model.safetensors.index.json (torchtitan's last_save_in_hf)
"""

from __future__ import annotations

from pathlib import Path

import common
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

VARIANTS = ("sharded", "consolidated")


def train_and_save(out: Path, variant: str, steps: int, world: int) -> None:
    """Runs on: all ranks. Trains an untied model and writes one save and the references."""
    mesh = init_device_mesh("cpu", (world,))
    model = common.build_model(tie=False)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    common.train(model, optim, steps)

    state = get_model_state_dict(model)
    ckpt = out / variant / "checkpoint" / f"step-{steps}"
    if variant == "sharded":
        writer = HuggingFaceStorageWriter(str(ckpt), save_distributed=True)
    else:  # two output files, as torchtitan maps names to files
        mapping = {name: 1 if i % 2 == 0 else 2 for i, name in enumerate(sorted(state))}
        writer = HuggingFaceStorageWriter(
            str(ckpt), fqn_to_index_mapping=mapping, save_distributed=True, enable_consolidation=True
        )
    dcp.save(state, storage_writer=writer)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        common.save_reference(out / variant, full, tie=False)
    dist.barrier()


def main() -> None:
    args = common.trainer_args(__doc__, VARIANTS)
    _, world = common.init_gloo()
    for variant in args.variant or list(VARIANTS):
        train_and_save(args.out, variant, args.steps, world)
    common.finish()


if __name__ == "__main__":
    main()
