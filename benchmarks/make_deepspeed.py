"""Write a DeepSpeed ZeRO-3 checkpoint of a Llama-shaped model, as `engine.save_checkpoint` leaves it.

    torchrun --standalone --nproc_per_node=N benchmarks/make_deepspeed.py OUT --size-gib G [--steps 0]

The model is a transformers LlamaForCausalLM with make_synthetic's shapes for G GiB of bf16 weights
(`choose_dims`, untied embeddings), built under `deepspeed.zero.Init`, so no rank ever holds the whole model:
each module is partitioned over the N ranks as soon as it is constructed (its weights are the modules' own
default initialization, cast to bf16). `deepspeed.initialize` runs ZeRO stage 3 with bf16 mixed precision
and torch's AdamW on CPU/gloo, as examples/trainers/deepspeed_zero.py does, then
`engine.save_checkpoint(OUT/ds)` writes OUT/ds/{latest, global_step<k>/, zero_to_fp32.py}.

With --steps 0 (the default) no training step is taken: the optimizer files hold the fp32 master partitions
but no Adam moments (AdamW creates them on its first step). --steps K trains K tiny steps first, so the
files also hold exp_avg and exp_avg_sq (3x the fp32 bytes), as a checkpoint from a real run does.
Rank 0 writes OUT/config.json (the LlamaConfig, dtype bfloat16).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed
import torch
import torch.distributed as dist
from make_synthetic import VOCAB, choose_dims
from make_synthetic import llama_config as synthetic_llama_config
from transformers import LlamaConfig, LlamaForCausalLM


def llama_config(size_gib: float) -> LlamaConfig:
    """The LlamaConfig of make_synthetic's shapes for `size_gib` GiB of bf16 weights."""
    config = synthetic_llama_config(*choose_dims(size_gib, torch.bfloat16.itemsize), "bfloat16")
    config.max_position_embeddings = 256
    return config


def ds_config(world: int) -> dict:
    """ZeRO stage 3, bf16 mixed precision, torch's AdamW (no compiled ops)."""
    return {
        "train_batch_size": world,
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 3},
        "steps_per_print": 1_000_000,
        "wall_clock_breakdown": False,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--size-gib", type=float, required=True)
    parser.add_argument("--steps", type=int, default=0, help="training steps before saving (0: none)")
    args = parser.parse_args()

    start = time.perf_counter()
    # No compiled DeepSpeed ops (see examples/trainers/deepspeed_zero.py): torch's AdamW, plain gloo collectives
    # (set before deepspeed.comm starts, which would otherwise build its shared-memory op).
    deepspeed.ops.__compatible_ops__ = {}
    dist.init_process_group("gloo")
    deepspeed.init_distributed("gloo")  # zero.Init reads the world size from deepspeed.comm
    rank, world = dist.get_rank(), dist.get_world_size()
    config = llama_config(args.size_gib)
    ds = ds_config(world)
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=ds, dtype=torch.bfloat16):
        model = LlamaForCausalLM(config)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    engine.train()
    for step in range(args.steps):
        gen = torch.Generator().manual_seed(1000 * step + rank)
        ids = torch.randint(0, VOCAB, (1, 8), generator=gen)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    engine.save_checkpoint(str(args.out / "ds"))

    if rank == 0:
        config.to_json_file(args.out / "config.json")
        numel = sum(p.ds_numel for p in engine.module.parameters())
        print(
            f"wrote {args.out}/ds: {numel / 1e6:.1f} M parameters ({numel * 2 / 2**30:.3f} GiB bf16), "
            f"hidden={config.hidden_size} intermediate={config.intermediate_size} "
            f"layers={config.num_hidden_layers}, ZeRO-3 over {world} ranks, {args.steps} step(s), "
            f"{time.perf_counter() - start:.1f} s"
        )
    dist.barrier()
    engine.destroy()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
