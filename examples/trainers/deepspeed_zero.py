"""Train a tiny Llama with DeepSpeed ZeRO 1/2/3 on CPU/gloo (bf16, AdamW) and save with `engine.save_checkpoint`.

    DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node=2 examples/trainers/deepspeed_zero.py OUT \
        [--variant NAME ...] [--steps N]

Variants are `zero<STAGE>-<KIND>` with STAGE 1, 2 or 3 and KIND:
  tied, untied   tied / untied embeddings, every parameter trained
  frozen         untied; embed_tokens and all of layer 0 frozen (requires_grad=False, not given to the optimizer)
  extras         untied, hidden size 63 (odd-sized norm weights: ZeRO-3 pads every rank's part, and ZeRO 1/2 run
                 with `parameter_alignment`, which pads between parameters), plus two persistent buffers the Llama
                 architecture does not have (int64 and float32). No config.json: finalize writes names as stored.

Each variant goes to OUT/<variant>/, laid out as `engine.save_checkpoint(OUT/<variant>)` leaves it: `latest`,
`global_step<k>/` for every step k (a checkpoint after each step) and `zero_to_fp32.py`. Beside them:
  config.json          the model's config as `save_pretrained` writes it for the trained (bf16) module
  reference.pt         rank 0: the trained module's full state dict (bf16, gathered for ZeRO-3)
  reference_logits.pt  rank 0: logits of those weights (see common.save_reference)
For bit-exact checks of the float32 master weights use
`deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint` on the checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import common
import deepspeed
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

STAGES = (1, 2, 3)
KINDS = ("tied", "untied", "frozen", "extras")
VARIANTS = tuple(f"zero{s}-{k}" for s in STAGES for k in KINDS)


def ds_config(stage: int, world: int, kind: str) -> dict:
    """bf16 mixed precision, torch's AdamW (no compiled ops), ZeRO `stage`."""
    zero: dict = {"stage": stage}
    if kind == "extras":
        zero["parameter_alignment"] = True
    return {
        "train_batch_size": 2 * world,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "bf16": {"enabled": True},
        "zero_optimization": zero,
        "steps_per_print": 1_000_000,
        "wall_clock_breakdown": False,
    }


def build(kind: str) -> torch.nn.Module:
    """The tiny Llama of `kind`, same weights on every rank."""
    if kind == "extras":
        config = common.tiny_config(tie=False)
        config.hidden_size, config.head_dim = 63, 16
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    else:
        model = common.build_model(tie=kind == "tied")
    if kind == "frozen":
        model.model.embed_tokens.weight.requires_grad_(False)
        for p in model.model.layers[0].parameters():
            p.requires_grad_(False)
    if kind == "extras":
        model.model.register_buffer("step_counter", torch.tensor(7, dtype=torch.int64), persistent=True)
        model.model.layers[1].register_buffer("scale", torch.linspace(0.5, 2.0, 5), persistent=True)
    return model


def param_groups(model: torch.nn.Module) -> list[dict]:
    """Two groups, as the Hugging Face Trainer makes them: weight decay for matrices, none for norms."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in params if p.dim() >= 2], "weight_decay": 0.01},
        {"params": [p for n, p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def full_state_dict(engine, stage: int) -> dict[str, torch.Tensor]:
    """Runs on: all ranks. The module's full state dict (ZeRO-3 parameters gathered), cloned to CPU."""
    module = engine.module
    if stage < 3:
        return {k: v.detach().clone() for k, v in module.state_dict().items()}
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}


def train_and_save(out: Path, variant: str, steps: int, world: int) -> None:
    """Runs on: all ranks. Trains one variant, saving a checkpoint after every step, then the references."""
    stage, kind = int(variant[4]), variant.split("-", 1)[1]
    model = build(kind)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model),
        config=ds_config(stage, world, kind),
    )
    run = out / variant
    rank = dist.get_rank()
    engine.train()
    for step in range(steps):
        ids = common.batch(step, rank)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        engine.save_checkpoint(str(run))
    full = full_state_dict(engine, stage)
    if rank == 0:
        write_references(run, engine.module, full, kind)
    dist.barrier()
    engine.destroy()


def write_references(run: Path, module: torch.nn.Module, full: dict[str, torch.Tensor], kind: str) -> None:
    """Rank 0: reference.pt (+ logits and config.json, except for `extras`, which its architecture cannot load)."""
    if kind == "extras":
        torch.save(full, run / "reference.pt")
        return
    common.save_reference(run, full, tie=kind == "tied")
    # What save_pretrained writes for the trained module: dtype is the module's (bf16 under DeepSpeed's bf16).
    config = module.config
    config.dtype = str(next(module.parameters()).dtype).removeprefix("torch.")
    config.to_json_file(run / "config.json")


def main() -> None:
    args = common.trainer_args(__doc__, VARIANTS, steps=1)
    _, world = common.init_gloo()
    # No compiled DeepSpeed ops: AdamW is torch's, and collectives stay plain gloo instead of the shared-memory op
    # DeepSpeed would otherwise JIT-compile with a C++ toolchain on first use (deepspeed.ops keeps this dict
    # editable on purpose; probing it would run compilers too).
    deepspeed.ops.__compatible_ops__ = {}
    for variant in args.variant or ["zero3-untied"]:
        train_and_save(args.out, variant, args.steps, world)
    common.finish()


if __name__ == "__main__":
    main()
