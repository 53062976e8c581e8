"""Train a tiny Llama with the transformers Trainer on CPU (one process) and keep the model dirs it saves.

    python examples/trainers/hf_trainer.py OUT [--variant NAME ...] [--steps N]

Variants (each goes to OUT/NAME/; reference.pt and reference_logits.pt, the trained model's, beside it):
  trainer-tied, trainer-untied   the Trainer's own output_dir: checkpoint-<steps/2>/ and checkpoint-<steps>/, each
                                 model.safetensors + config.json + tokenizer + optimizer.pt, scheduler.pt,
                                 rng_state.pth, trainer_state.json, training_args.bin (tied: no lm_head stored)
  sharded-safetensors            save_pretrained(max_shard_size="100KB") of the untied run: shards + index
  bin, sharded-bin               pytorch_model.bin (in a copy of the tied run's last checkpoint-N, beside the
                                 Trainer's optimizer.pt and the rest) and pytorch_model-*.bin + index (untied run),
                                 written by huggingface_hub's save_torch_state_dict(safe_serialization=False): the
                                 transformers installed here (5.x) writes only safetensors, and that function
                                 writes the layout transformers 4.x's `save_safetensors=False` wrote
"""

from __future__ import annotations

import shutil
from pathlib import Path

import common
import torch
from huggingface_hub import save_torch_state_dict
from transformers import Trainer, TrainingArguments

VARIANTS = ("trainer-tied", "trainer-untied", "sharded-safetensors", "bin", "sharded-bin")
SHARD_SIZE = "100KB"


class Tokens(torch.utils.data.Dataset):
    """Deterministic random token sequences, as a causal-LM dataset."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = common.batch(i, 0)[0]
        return {"input_ids": ids, "labels": ids}


def train(out: Path, tie: bool, steps: int) -> torch.nn.Module:
    """A real Trainer run: `steps` AdamW steps, a checkpoint every steps/2. Writes the references beside it."""
    model = common.build_model(tie)
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        save_steps=max(1, steps // 2),
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        use_cpu=True,
        report_to=[],
        logging_steps=steps,
        disable_tqdm=True,
        seed=0,
    )
    Trainer(model=model, args=args, train_dataset=Tokens(), processing_class=common.build_tokenizer()).train()
    save_references(out, model)
    return model


def save_references(out: Path, model: torch.nn.Module) -> None:
    """reference.pt (every key of the trained model) and reference_logits.pt beside the saves."""
    model.eval()
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out / "reference.pt")
    with torch.no_grad():
        torch.save(model(input_ids=common.reference_input()).logits, out / "reference_logits.pt")


def save_pretrained_dir(out: Path, model: torch.nn.Module, bin_files: bool) -> None:
    """A sharded model dir with config and tokenizer, as save_pretrained (safetensors) or transformers 4.x's
    save_safetensors=False (.bin) writes it."""
    out.mkdir(parents=True)
    model.config.save_pretrained(out)
    common.build_tokenizer().save_pretrained(out)
    if bin_files:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_torch_state_dict(state, out, safe_serialization=False, max_shard_size=SHARD_SIZE)
    else:
        model.save_pretrained(out, max_shard_size=SHARD_SIZE)
    save_references(out, model)


def bin_checkpoint(out: Path, trained: Path, model: torch.nn.Module, steps: int) -> None:
    """The tied run's last checkpoint-N with its weights as pytorch_model.bin (everything else the Trainer's)."""
    ckpt = out / f"checkpoint-{steps}"
    shutil.copytree(trained / f"checkpoint-{steps}", ckpt)
    (ckpt / "model.safetensors").unlink()
    save_torch_state_dict(dict(model.state_dict()), ckpt, safe_serialization=False, max_shard_size="1GB")
    for name in ("reference.pt", "reference_logits.pt"):
        shutil.copy(trained / name, out / name)


def main() -> None:
    args = common.trainer_args(__doc__, VARIANTS, steps=4)
    wanted = args.variant or list(VARIANTS)
    models = {}
    for tie in (True, False):
        name = "trainer-tied" if tie else "trainer-untied"
        if name in wanted or (not tie and "sharded" in " ".join(wanted)) or (tie and "bin" in wanted):
            models[tie] = train(args.out / name, tie, args.steps)
    if "sharded-safetensors" in wanted:
        save_pretrained_dir(args.out / "sharded-safetensors", models[False], bin_files=False)
    if "sharded-bin" in wanted:
        save_pretrained_dir(args.out / "sharded-bin", models[False], bin_files=True)
    if "bin" in wanted:
        bin_checkpoint(args.out / "bin", args.out / "trainer-tied", models[True], args.steps)


if __name__ == "__main__":
    main()
