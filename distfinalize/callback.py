"""FinalizeCallback: a transformers TrainerCallback (TRL's trainers included) that finalizes the run's last
checkpoint, or the best one when the Trainer tracks it, when training ends: on every rank of the training job,
in its own process group, with no relaunch. Runs on: all ranks (the Trainer calls callbacks on every process).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from distfinalize.api import finalize
from distfinalize.errors import SourceError

log = logging.getLogger(__name__)


class FinalizeCallback(TrainerCallback):
    """`trainer.add_callback(FinalizeCallback("/models/run1", base_model="Qwen/Qwen2.5-0.5B"))`.

    `dest` must not exist; `options` are distfinalize.finalize's (the command line's, as keywords). SRC is the
    Trainer's output_dir, so config.json and the tokenizer are looked for beside its checkpoints as on the command
    line. For a peft model, what the Trainer's sharded saves leave out is taken from the trained model unless given:
    `base_model` (the adapter's base_model_name_or_path), `lora_alpha` and `lora_rslora`. A failure raises
    DistfinalizeError out of `trainer.train()` on every rank, after training is done and its checkpoints are saved.
    `outcome` holds what the finalize did."""

    def __init__(self, dest: str | os.PathLike, **options: Any) -> None:
        self.dest = Path(dest)
        self.options = options
        self.outcome = None

    def on_train_end(self, args, state, control, **kwargs):
        best = state.best_model_checkpoint
        checkpoint = Path(best) if best and Path(best).is_dir() else None
        if checkpoint is None and not any(Path(args.output_dir).glob("checkpoint-*")):
            raise SourceError(
                "the Trainer saved no checkpoint to finalize",
                where=args.output_dir,
                hint="save one at the end of training (save_strategy, save_steps)",
            )
        options = {**peft_options(kwargs.get("model")), **self.options}
        if checkpoint is not None:
            options["checkpoint"] = checkpoint
        which = "best" if checkpoint else "last"
        log.info("finalizing the %s checkpoint of %s into %s", which, args.output_dir, self.dest)
        self.outcome = finalize(args.output_dir, self.dest, **options)
        return control


def peft_options(model: Any) -> dict[str, Any]:
    """base_model, lora_alpha and lora_rslora of a peft model's active LoRA adapter (none for another model)."""
    configs = getattr(model, "peft_config", None)
    active = getattr(model, "active_adapter", None)
    config = configs.get(active) if isinstance(configs, dict) and isinstance(active, str) else None
    if config is None or getattr(config, "peft_type", None) != "LORA":
        return {}
    out: dict[str, Any] = {"lora_alpha": config.lora_alpha, "lora_rslora": bool(config.use_rslora)}
    if config.base_model_name_or_path:
        out["base_model"] = config.base_model_name_or_path
    return out
