"""LoRA / PEFT checkpoints: recognise their names, and merge an adapter into its base weight.

A PeftModel's state dict (saved through FSDP2's get_model_state_dict and DCP) spells the model's own names
under `base_model.model.`, with `base_layer.` inside adapted modules, `lora_A.<adapter>.weight` /
`lora_B.<adapter>.weight` (`lora_embedding_A.<adapter>` for embeddings), and `modules_to_save.<adapter>.` /
`original_module.` for fully trained copies. PEFT's saved format (get_peft_model_state_dict: save_pretrained,
and the Trainer's adapter-only FSDP saves) drops the adapter name (`lora_A.weight`, `lora_embedding_A`, a
trained copy under the module's own name); its adapter is `default`. Name handling is pure (all ranks);
`merge_lora` runs on the rank that writes the weight, on its device.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from distfinalize.transform.names import strip_wrappers

PEFT_PREFIX = "base_model.model."
LORA_WEIGHT = re.compile(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)\.([^.]+)(?:\.|$)")
TRAINED_COPY = re.compile(r"\.modules_to_save\.([^.]+)\.")
SAVED_LORA_WEIGHT = re.compile(r"\.(?:lora_A|lora_B)\.(?:weight|bias)$|\.lora_embedding_[AB]$")
SAVED_ADAPTER = "default"  # the adapter a saved-format checkpoint loads as (PeftModel.from_pretrained's default)


def is_lora_checkpoint(names: Iterable[str]) -> bool:
    """Whether tensor names hold LoRA weights (lora_A/lora_B or lora_embedding_A/B)."""
    return any(
        ((m := LORA_WEIGHT.search(strip_wrappers(n))) is not None and m.group(1) != "lora_magnitude_vector")
        or SAVED_LORA_WEIGHT.search(strip_wrappers(n)) is not None
        for n in names
    )


def is_saved_format(names: Iterable[str]) -> bool:
    """Whether LoRA weight names are PEFT's saved format (no adapter-name segment: `q_proj.lora_A.weight`)."""
    return any(SAVED_LORA_WEIGHT.search(strip_wrappers(n)) for n in names)


def adapter_names(names: Iterable[str]) -> set[str]:
    """The adapter names in LoRA weight names (`default` for a plain get_peft_model, and for PEFT's saved
    format, which has none)."""
    names = list(names)
    if is_saved_format(names):
        return {SAVED_ADAPTER}
    found = {m.group(2) for n in names if (m := LORA_WEIGHT.search(strip_wrappers(n)))}
    return found | {m.group(1) for n in names if (m := TRAINED_COPY.search(strip_wrappers(n)))}


def is_lora_weight(peft_name: str) -> bool:
    """A LoRA parameter (A, B, DoRA magnitude), as opposed to a base-model tensor or a trained copy."""
    return LORA_WEIGHT.search(peft_name) is not None


def peft_name(name: str, prefix: str) -> str:
    """A checkpoint name as the PeftModel's state dict spells it: wrapper segments removed, then either the part
    from `base_model.model.` on, or `prefix` removed and `base_model.model.` put in front (an adapter injected
    without the PeftModel wrapper)."""
    name = strip_wrappers(name)
    at = name.find(PEFT_PREFIX)
    if at == 0 or (at > 0 and name[at - 1] == "."):
        return name[at:]
    if prefix and name.startswith(prefix):
        name = name[len(prefix) :]
    return PEFT_PREFIX + name


def merged_name(name: str, adapter: str) -> str | None:
    """The Hugging Face name a PeftModel tensor has in the merged model (merge_and_unload), or None when the
    tensor is not part of it (`original_module`, superseded by the trained copy)."""
    if ".original_module." in f".{name}":
        return None
    name = name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")
    return name.replace(f".modules_to_save.{adapter}.", ".")


@dataclass(frozen=True)
class LoraMerge:
    """What to add to one base weight: scale * (B @ A), transposed for embeddings and fan-in-fan-out layers
    (peft's get_delta_weight). `a_key` / `b_key` are the checkpoint keys of A and B."""

    a_key: str
    b_key: str
    scale: float
    transpose: bool = False
    nbytes: int = 0  # bytes of A and B, for read batching

    @property
    def keys(self) -> tuple[str, str]:
        return (self.a_key, self.b_key)


def merge_lora(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, merge: LoraMerge) -> torch.Tensor:
    """W + (B @ A) * scale in float32 on W's device (peft's order of operations); the caller casts the result.

    Runs on: the rank that writes the weight."""
    device = weight.device
    delta = b.to(device, torch.float32) @ a.to(device, torch.float32)
    if merge.transpose:
        delta = delta.T
    return weight.to(torch.float32) + delta * merge.scale
