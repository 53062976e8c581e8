"""Fine-tune a tiny Llama with TRL's SFTTrainer and a peft LoraConfig under Accelerate FSDP2 on CPU/gloo.

    torchrun --standalone --nproc_per_node=2 examples/trainers/trl_sft_lora.py OUT [--steps N]
             [--finalize DEST [--finalize-arg ARG ...]]

Writes, as a TRL run leaves them:
  OUT/base-model/         the base model (save_pretrained) and tokenizer the run starts from
  OUT/run/checkpoint-N/   the Trainer's checkpoint with `fsdp_config` fsdp_version 2, SHARDED_STATE_DICT:
                          pytorch_model_fsdp_0/ (DCP of the adapter only, named as get_peft_model_state_dict
                          names it: `...q_proj.lora_A.weight`, no adapter name), optimizer_0/, trainer_state.json;
                          no config.json, no adapter_config.json, no tokenizer
and, from rank 0, into OUT/:
  reference.pt / reference_logits.pt   the trained PeftModel's full state dict and its logits
  merged.pt / merged_logits.pt         merge_and_unload()'s state dict and logits
  lora_config.json                     the LoraConfig trained with (what a finalize must be told or recover)

With --finalize DEST, a `distfinalize.FinalizeCallback(DEST, ...)` finalizes the last checkpoint on every rank
when training ends, in the training job's own process group, which the script then goes on using
(--finalize-arg: more options as `name=value`, e.g. max_shard_size=100KB).

Accelerate turns FSDP on only for accelerator device types (MULTI_GPU, MULTI_XPU, ...): on a CPU-only host
`AcceleratorState` picks MULTI_CPU and drops the FSDP plugin that the Trainer built from `fsdp_config`, so the
run would silently train as DDP. The trainer below switches the state to FSDP right after the Trainer created its
Accelerator, as `AcceleratorState.__init__` does for GPUs (the same switch as accelerate_fsdp.py); everything
else (prepare, fully_shard, the training loop, the checkpoint saving) is TRL's, the Trainer's and Accelerate's
own code.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import common
import torch
import torch.distributed as dist
from accelerate.state import PartialState
from accelerate.utils import DistributedType
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer


def lora_config() -> LoraConfig:
    """The adapter trained (attention and MLP projections, rsLoRA off)."""
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")


def dataset() -> Dataset:
    """A tiny in-memory text dataset."""
    texts = [f"the quick brown fox {i} jumps over the lazy dog number {i * 7}" for i in range(32)]
    return Dataset.from_dict({"text": texts})


class CpuFsdpSFTTrainer(SFTTrainer):
    """SFTTrainer whose Accelerator runs FSDP on CPU/gloo (see the module docstring for why the switch is needed)."""

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None) or _plugin(self.args)
        self.accelerator.state.distributed_type = DistributedType.FSDP
        self.accelerator.state.fsdp_plugin = plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.is_fsdp_enabled = True
        if not self.accelerator.is_fsdp2:
            raise RuntimeError("the accelerator is not in FSDP2 mode")


def _plugin(args: SFTConfig):
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)


def sft_config(run: Path, steps: int) -> SFTConfig:
    return SFTConfig(
        output_dir=str(run),
        max_steps=steps,
        save_steps=steps,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        max_length=24,
        use_cpu=True,
        fsdp="full_shard",
        fsdp_config={
            "fsdp_version": 2,
            "state_dict_type": "SHARDED_STATE_DICT",
            "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
            "reshard_after_forward": True,
            "cpu_ram_efficient_loading": False,
        },
        dataloader_num_workers=0,
        seed=0,
    )


def finalize_callbacks(dest: Path | None, pairs: list[str]) -> list:
    if dest is None:
        return []
    import distfinalize

    options = dict(pair.split("=", 1) for pair in pairs)
    return [distfinalize.FinalizeCallback(dest, **options)]


def save_references(out: Path, full: dict[str, torch.Tensor]) -> None:
    """Rank 0: the trained PeftModel's state and logits, and the merged model's."""
    state = {k: v.detach().clone().cpu() for k, v in full.items()}
    torch.save(state, out / "reference.pt")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(out / "base-model"), lora_config())
    model.load_state_dict(state, strict=True)
    model.eval()
    with torch.no_grad():
        torch.save(model(input_ids=common.reference_input()).logits, out / "reference_logits.pt")
        merged = model.merge_and_unload()
        torch.save({k: v.clone() for k, v in merged.state_dict().items()}, out / "merged.pt")
        torch.save(merged(input_ids=common.reference_input()).logits, out / "merged_logits.pt")
    (out / "lora_config.json").write_text(json.dumps(lora_config().to_dict(), default=list))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--finalize", type=Path)
    parser.add_argument("--finalize-arg", action="append", default=[])
    args = parser.parse_args()
    rank, _ = common.init_gloo()
    base = args.out / "base-model"
    if rank == 0:
        common.build_model(tie=False).save_pretrained(base)
        common.build_tokenizer().save_pretrained(base)
    dist.barrier()
    trainer = CpuFsdpSFTTrainer(
        model=str(base),
        args=sft_config(args.out / "run", args.steps),
        train_dataset=dataset(),
        processing_class=common.build_tokenizer(),
        peft_config=lora_config(),
        callbacks=finalize_callbacks(args.finalize, args.finalize_arg),
    )
    trainer.train()
    if not dist.is_initialized():
        raise RuntimeError("the training job's process group is gone after training")
    full = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        save_references(args.out, full)
    dist.barrier()
    common.finish()


if __name__ == "__main__":
    main()
