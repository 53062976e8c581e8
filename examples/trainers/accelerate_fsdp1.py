"""Train a tiny Llama with Hugging Face Accelerate's FSDP1 on CPU/gloo and save the per-rank files FSDP1 can write.

    torchrun --standalone --nproc_per_node=2 examples/trainers/accelerate_fsdp1.py OUT [--variant V ...] [--steps N]

Variants (OUT/accelerate1-<variant>/: config.json, tokenizer, reference.pt, reference_logits.pt and
checkpoints/checkpoint-<steps>/):
  sharded   `fsdp_state_dict_type: SHARDED_STATE_DICT` saved without DCP: Accelerate's
            `save_fsdp_model(..., use_dcp=False)` writes `pytorch_model_fsdp_0_rank<R>.bin` (torch.save of each
            rank's sharded state dict: ShardedTensors); `save_state` itself always takes the DCP path
  local     `fsdp_state_dict_type: LOCAL_STATE_DICT`: `save_state` writes `pytorch_model_fsdp_rank<R>.bin`
            (each rank's flat-parameter shards)

As in accelerate_fsdp.py, the Accelerator is built with `cpu=True` (gloo) and switched to FSDP the way
`AcceleratorState.__init__` does it for GPUs; FSDP1 on CPU also needs the `device_id` Accelerate passes
(`accelerator.device`) to be `cpu` without an index. Everything else, `prepare` and the saves, is Accelerate's own code.
"""

from __future__ import annotations

from pathlib import Path

import common
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, save_fsdp_model
from torch.distributed.fsdp import FullStateDictConfig, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

VARIANTS = ("sharded", "local")


def fsdp1_accelerator(state_dict_type: str) -> Accelerator:
    """Runs on: all ranks. An Accelerator on CPU/gloo that takes Accelerate's FSDP1 code paths."""
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=1,
        state_dict_type=state_dict_type,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
        use_orig_params=True,
        cpu_ram_efficient_loading=False,
        sync_module_states=False,
    )
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    PartialState._shared_state["device"] = accelerator.state.device = torch.device("cpu")  # FSDP1: no index on CPU
    if accelerator.is_fsdp2:
        raise RuntimeError("accelerator is not in FSDP1 mode")
    return accelerator


def train_and_save(out: Path, variant: str, steps: int) -> None:
    """Runs on: all ranks. Trains one variant and writes its checkpoint and references."""
    name = f"accelerate1-{variant}"
    accelerator = fsdp1_accelerator("SHARDED_STATE_DICT" if variant == "sharded" else "LOCAL_STATE_DICT")
    model = common.build_model(tie=False)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optim = accelerator.prepare(model, optim)
    common.train(model, optim, steps)

    ckpt = out / name / "checkpoints" / f"checkpoint-{steps}"
    if variant == "sharded":
        save_fsdp_model(accelerator.state.fsdp_plugin, accelerator, model, str(ckpt), use_dcp=False)
    else:
        accelerator.save_state(str(ckpt))

    # accelerator.get_state_dict offloads to CPU, which crashes FSDP1 on a CPU-only host: the full state dict as
    # FSDP1 gives it without offloading instead
    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=False)):
        full = {k: v.clone() for k, v in model.state_dict().items()}
    if accelerator.is_main_process:
        common.save_reference(out / name, full, tie=False)
    accelerator.wait_for_everyone()
    AcceleratorState._reset_state()


def main() -> None:
    args = common.trainer_args(__doc__, VARIANTS)
    common.init_gloo()
    for variant in args.variant or ["sharded"]:
        train_and_save(args.out, variant, args.steps)
    common.finish()


if __name__ == "__main__":
    main()
