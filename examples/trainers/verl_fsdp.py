"""Train a tiny Llama with FSDP2 or FSDP1 on CPU/gloo and save it exactly as verl's FSDPCheckpointManager does.

    torchrun --standalone --nproc_per_node=2 examples/trainers/verl_fsdp.py OUT [--variant V ...] [--steps N]

verl itself does not install beside this project's transformers (it pins an older one and pulls Ray), so the
checkpoint is written by the same calls as `verl.utils.checkpoint.fsdp_checkpoint_manager.FSDPCheckpointManager
.save_checkpoint` (verl 0.9), on a model wrapped as `verl.workers.fsdp_workers` wraps the actor:
  - the device mesh of `create_device_mesh`: ("fsdp",) of the world size, or ("ddp", "fsdp") for hybrid sharding;
  - FSDP2: `fully_shard` on every decoder layer (and the embedding when untied), then the root, with
    `shard_placement_fn=get_shard_placement_fn(fsdp_size)`; FSDP1: `FullyShardedDataParallel` with a transformer
    auto-wrap policy, FULL_SHARD (HYBRID_SHARD on a 2-D mesh), `device_mesh=` and `use_orig_params=False` (not
    `sync_module_states`, which needs a GPU: every rank builds the same seeded weights instead);
  - under `FSDP.state_dict_type(SHARDED_STATE_DICT)` (FSDP1; FSDP2 needs no context) every rank does
    `torch.save(model.state_dict(), "model_world_size_{W}_rank_{R}.pt")`, the same for the optimizer
    (`optim_...`) and `{"lr_scheduler": ..., "rng": ...}` (`extra_state_...`);
  - rank 0 writes `huggingface/` (config + tokenizer `save_pretrained`) and `fsdp_config.json`
    (`{"FSDP_version": 1|2, "world_size": W}`); the trainer writes `latest_checkpointed_iteration.txt`.

Variants (OUT/verl-<variant>/global_step_<steps>/actor/, references in OUT/verl-<variant>-ref/):
  fsdp2        FSDP2 on a 1-D ("fsdp",) mesh (untied embeddings)
  fsdp2-tied   the same with tied embeddings
  fsdp1        FSDP1 on a 1-D mesh
  hsdp2        FSDP2 on a ("ddp", "fsdp") mesh of shape (W, 1): every rank holds a whole replica
  lora         FSDP2 of a peft LoRA actor (`actor_rollout_ref.model.lora_rank > 0`): the rank files hold the
               PeftModel (`base_model.model....lora_A.default.weight`, frozen base included) and, as verl's
               fsdp_workers.save_checkpoint does after the manager, rank 0 writes `lora_adapter/adapter_config.json`
               (`asdict(peft_config)`) and `lora_adapter/adapter_model.safetensors` (the gathered adapter, with
               peft's `get_peft_model_state_dict` names); its references add merged.pt / merged_logits.pt
               (peft's merge_and_unload)
"""

from __future__ import annotations

import json
import random
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import common
import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import (
    ShardedOptimStateDictConfig,
    ShardedStateDictConfig,
    ShardingStrategy,
    StateDictType,
    fully_shard,
)
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
from torch.distributed.tensor import Shard
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

VARIANTS = ("fsdp2", "fsdp2-tied", "fsdp1", "hsdp2", "lora")


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def build(variant: str) -> nn.Module:
    """The seeded tiny Llama (wrapped by peft's get_peft_model for the LoRA actor)."""
    model = common.build_model(variant.endswith("tied"))
    if variant == "lora":
        from peft import get_peft_model

        model = get_peft_model(model, lora_config())
    return model


def save_lora_adapter(model: nn.Module, local_path: Path) -> None:
    """Runs on: all ranks. What verl's fsdp_workers.save_checkpoint adds for a LoRA actor (rank 0 writes)."""
    from dataclasses import asdict

    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        target = local_path / "lora_adapter"
        target.mkdir(exist_ok=True)
        config = asdict(model.peft_config["default"])
        for key in ("task_type", "peft_type"):  # enums in the peft verl pins, plain strings in newer peft
            config[key] = getattr(config[key], "value", config[key])
        config["target_modules"] = list(config["target_modules"])
        weights = get_peft_model_state_dict(model, state_dict=full)
        save_file({k: v.contiguous() for k, v in weights.items()}, target / "adapter_model.safetensors")
        (target / "adapter_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=4, default=str))
    dist.barrier()


def save_lora_references(ref: Path, full: dict[str, torch.Tensor]) -> None:
    """Rank 0: the trained PeftModel's state and logits, and peft's merge_and_unload of it."""
    ref.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone().cpu() for k, v in full.items()}
    torch.save(state, ref / "reference.pt")
    model = build("lora")
    model.load_state_dict(state, strict=True)
    model.eval()
    with torch.no_grad():
        torch.save(model(input_ids=common.reference_input()).logits, ref / "reference_logits.pt")
        merged = model.merge_and_unload()
        torch.save({k: v.clone() for k, v in merged.state_dict().items()}, ref / "merged.pt")
        torch.save(merged(input_ids=common.reference_input()).logits, ref / "merged_logits.pt")


def shard_placement_fn(fsdp_size: int):
    """verl.utils.fsdp_utils.get_shard_placement_fn: the first dim that divides the FSDP size, else dim 0."""

    def place(param: torch.Tensor) -> Shard:
        return next((Shard(i) for i, n in enumerate(param.shape) if n % fsdp_size == 0), Shard(0))

    return place


def wrap(model: nn.Module, variant: str, world: int) -> nn.Module:
    """Runs on: all ranks. The actor wrapped the way verl's fsdp_workers does."""
    if variant.startswith("hsdp"):
        mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("ddp", "fsdp"))
    else:
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",))
    if variant == "fsdp1":
        policy = partial(transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer})
        strategy = ShardingStrategy.FULL_SHARD if mesh.ndim == 1 else ShardingStrategy.HYBRID_SHARD
        return FSDP(
            model,
            auto_wrap_policy=policy,
            sharding_strategy=strategy,
            device_mesh=mesh,
            use_orig_params=False,
            device_id=torch.device("cpu"),  # verl passes its GPU; FSDP1 runs on CPU only when told so
        )
    kwargs = {"mesh": mesh, "reshard_after_forward": True, "shard_placement_fn": shard_placement_fn(mesh.shape[-1])}
    for module in model.modules():
        if isinstance(module, LlamaDecoderLayer) or (
            isinstance(module, nn.Embedding) and not model.config.tie_word_embeddings
        ):
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model


def save_checkpoint(model: nn.Module, optim: torch.optim.Optimizer, local_path: Path, fsdp1: bool, world: int):
    """Runs on: all ranks. What FSDPCheckpointManager.save_checkpoint writes (model, optimizer, extra state)."""
    rank = dist.get_rank()
    if rank == 0:
        local_path.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    ctx = (
        FSDP.state_dict_type(
            model,
            StateDictType.SHARDED_STATE_DICT,
            ShardedStateDictConfig(offload_to_cpu=False),
            ShardedOptimStateDictConfig(offload_to_cpu=False),
        )
        if fsdp1
        else nullcontext()
    )
    with ctx:
        torch.save(model.state_dict(), local_path / f"model_world_size_{world}_rank_{rank}.pt")
        torch.save(optim.state_dict(), local_path / f"optim_world_size_{world}_rank_{rank}.pt")
        rng = {"cpu": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate()}
        torch.save({"lr_scheduler": None, "rng": rng}, local_path / f"extra_state_world_size_{world}_rank_{rank}.pt")
    if rank == 0:
        unwrapped = model._fsdp_wrapped_module if fsdp1 else model
        hf = local_path / "huggingface"
        hf.mkdir(exist_ok=True)
        unwrapped.config.save_pretrained(hf)
        common.build_tokenizer().save_pretrained(hf)
        config = {"FSDP_version": 1 if fsdp1 else 2, "world_size": world}
        (local_path / "fsdp_config.json").write_text(json.dumps(config, indent=4))
    dist.barrier()


def full_state_dict(model: nn.Module, fsdp1: bool) -> dict[str, torch.Tensor]:
    """Runs on: all ranks. The trained weights, whole (what rank 0 keeps as the reference)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if fsdp1:
        with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT):
            return {k.replace("_fsdp_wrapped_module.", ""): v for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def train_and_save(out: Path, variant: str, steps: int, world: int) -> None:
    """Runs on: all ranks. Trains one variant and writes its checkpoint and references."""
    tie = variant.endswith("tied")
    fsdp1 = variant == "fsdp1"
    model = wrap(build(variant), variant, world)
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    common.train(model, optim, steps)
    run = out / f"verl-{variant}"
    save_checkpoint(model, optim, run / f"global_step_{steps}" / "actor", fsdp1, world)
    if variant == "lora":
        save_lora_adapter(model, run / f"global_step_{steps}" / "actor")
    full = full_state_dict(model, fsdp1)
    if dist.get_rank() == 0:
        (run / "latest_checkpointed_iteration.txt").write_text(str(steps))
        if variant == "lora":
            save_lora_references(out / f"verl-{variant}-ref", full)
        else:
            common.save_reference(out / f"verl-{variant}-ref", full, tie)
    dist.barrier()


def main() -> None:
    args = common.trainer_args(__doc__, VARIANTS)
    _, world = common.init_gloo()
    for variant in args.variant or ["fsdp2"]:
        train_and_save(args.out, variant, args.steps, world)
    common.finish()


if __name__ == "__main__":
    main()
