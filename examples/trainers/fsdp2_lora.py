"""Train a tiny Llama with a peft LoRA adapter under FSDP2 (`fully_shard`) on CPU/gloo and save DCP checkpoints.

    torchrun --nproc_per_node=2 examples/trainers/fsdp2_lora.py OUT [--variant NAME ...] [--steps N]

Variants (each in OUT/NAME/, with the DCP files in OUT/NAME/checkpoints/checkpoint-<steps>/):
  lora-full          get_model_state_dict of the PeftModel: frozen base weights (`base_layer`,
                     `modules_to_save`/`original_module` of lm_head) + LoRA weights; adapter_config.json,
                     config.json and the tokenizer beside it, as a Trainer run leaves them
  lora-adapter-only  only the trainable tensors (StateDictOptions(ignore_frozen_params=True)): LoRA on
                     attention, MLP and the input embedding, rsLoRA; no config.json or adapter_config.json;
                     the untouched base model is saved to OUT/NAME/base-model/ (for --base-model)

Rank 0 also writes, into OUT/NAME/:
  reference.pt            the trained PeftModel's full state dict (its own names)
  reference_logits.pt     its logits on common.reference_input()
  merged.pt               merge_and_unload()'s state dict
  merged_logits.pt        the merged model's logits
"""

from __future__ import annotations

from pathlib import Path

import common
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from peft import LoraConfig, get_peft_model
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

VARIANTS = ("lora-full", "lora-adapter-only")


def lora_config(variant: str) -> LoraConfig:
    """The adapter each variant trains (its r, alpha and targets are what a finalize must recover)."""
    if variant == "lora-full":
        return LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj"],
            modules_to_save=["lm_head"],
            task_type="CAUSAL_LM",
        )
    return LoraConfig(
        r=8,
        lora_alpha=16,
        use_rslora=True,
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "o_proj", "gate_proj", "embed_tokens"],
    )


def build_peft_model(variant: str) -> torch.nn.Module:
    """The same seeded base on every rank, wrapped by get_peft_model."""
    return get_peft_model(common.build_model(tie=False), lora_config(variant))


def train_and_save(out: Path, variant: str, steps: int, world: int) -> None:
    """Runs on: all ranks. Trains one variant and writes its checkpoint and references."""
    run = out / variant
    mesh = init_device_mesh("cpu", (world,))
    model = build_peft_model(variant)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    common.train(model, optim, steps)

    ckpt = run / "checkpoints" / f"checkpoint-{steps}"
    adapter_only = variant == "lora-adapter-only"
    dcp.save(
        get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=adapter_only)),
        checkpoint_id=str(ckpt),
    )
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        save_references(run, variant, full)
    dist.barrier()


def save_references(run: Path, variant: str, full: dict[str, torch.Tensor]) -> None:
    """Rank 0: the files a training run leaves beside its checkpoints, and what the tests compare with."""
    common.build_tokenizer().save_pretrained(run)
    if variant == "lora-full":
        common.tiny_config(tie=False).save_pretrained(run)
        config = lora_config(variant)
        config.base_model_name_or_path = "tiny-llama"
        config.save_pretrained(run)
    else:
        base = common.build_model(tie=False)  # the frozen base: exactly the weights training started from
        base.save_pretrained(run / "base-model")
        common.build_tokenizer().save_pretrained(run / "base-model")
    state = {k: v.detach().clone().cpu() for k, v in full.items()}
    torch.save(state, run / "reference.pt")
    model = build_peft_model(variant)
    model.load_state_dict(state, strict=True)
    model.eval()
    with torch.no_grad():
        torch.save(model(input_ids=common.reference_input()).logits, run / "reference_logits.pt")
        merged = model.merge_and_unload()
        torch.save({k: v.clone() for k, v in merged.state_dict().items()}, run / "merged.pt")
        torch.save(merged(input_ids=common.reference_input()).logits, run / "merged_logits.pt")


def main() -> None:
    args = common.trainer_args(__doc__, VARIANTS)
    _, world = common.init_gloo()
    for variant in args.variant or list(VARIANTS):
        train_and_save(args.out, variant, args.steps, world)
    common.finish()


if __name__ == "__main__":
    main()
