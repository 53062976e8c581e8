"""Train a tiny Llama with Hugging Face Accelerate's FSDP2 on CPU/gloo and save with `accelerator.save_state`.

    torchrun --standalone --nproc_per_node=2 examples/trainers/accelerate_fsdp.py OUT [--variant V ...] [--steps N]

Variants (each goes to OUT/accelerate-<variant>/, laid out like a training run):
  tied, untied   OUT/accelerate-<variant>/config.json, reference.pt, reference_logits.pt and
                 OUT/accelerate-<variant>/checkpoints/checkpoint-<steps>/, written by `save_state` with
                 SHARDED_STATE_DICT: pytorch_model_fsdp_0/ (DCP, keys under "model."), optimizer_0/ (DCP),
                 random_states_<rank>.pkl.

Accelerate only turns on FSDP for accelerator device types (MULTI_GPU, MULTI_XPU, ...): on a CPU-only host it
picks MULTI_CPU with `cpu=True` (or NO without it) and ignores the plugin. So the Accelerator is built with
`cpu=True` (gloo) and then switched to FSDP the way `AcceleratorState.__init__` does it for GPUs (set
`distributed_type` and `fsdp_plugin`); everything after that, `prepare` and `save_state`, is Accelerate's own code.
"""

from __future__ import annotations

from pathlib import Path

import common
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

VARIANTS = ("tied", "untied")


def fsdp_accelerator() -> Accelerator:
    """Runs on: all ranks. An Accelerator on CPU/gloo that takes Accelerate's FSDP2 code paths."""
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        state_dict_type="SHARDED_STATE_DICT",
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
        reshard_after_forward=True,
        cpu_ram_efficient_loading=False,
    )
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
    # MULTI_CPU on a fresh process; FSDP if an earlier variant in this process already switched PartialState.
    if accelerator.distributed_type not in (DistributedType.MULTI_CPU, DistributedType.FSDP):
        raise RuntimeError(f"expected MULTI_CPU before switching to FSDP, got {accelerator.distributed_type}")
    # What AcceleratorState.__init__ does for MULTI_GPU & co. when given an fsdp_plugin; it skips MULTI_CPU.
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if not accelerator.is_fsdp2:
        raise RuntimeError("accelerator is not in FSDP2 mode")
    return accelerator


def train_and_save(out: Path, variant: str, steps: int) -> None:
    """Runs on: all ranks. Trains one variant and writes its checkpoint and references."""
    tie = variant == "tied"
    name = f"accelerate-{variant}"
    accelerator = fsdp_accelerator()
    model = common.build_model(tie)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optim = accelerator.prepare(model, optim)
    common.train(model, optim, steps)

    ckpt = out / name / "checkpoints" / f"checkpoint-{steps}"
    accelerator.save_state(str(ckpt))

    full = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        expected = set(model.state_dict())
        if set(full) != expected:
            raise RuntimeError(f"full state dict keys differ from the model's: {sorted(set(full) ^ expected)}")
        common.save_reference(out / name, full, tie)
    accelerator.wait_for_everyone()
    AcceleratorState._reset_state()


def main() -> None:
    args = common.trainer_args(__doc__, VARIANTS)
    common.init_gloo()
    for variant in args.variant or ["untied"]:
        train_and_save(args.out, variant, args.steps)
    common.finish()


if __name__ == "__main__":
    main()
