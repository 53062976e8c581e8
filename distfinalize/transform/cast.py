"""Assemble a tensor on the rank's device, resize and cast it as planned, and bring it back for writing."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from distfinalize.plan import TensorPlan
from distfinalize.transform.lora import merge_lora
from distfinalize.transform.rope import rope_to_hf
from distfinalize.transform.vocab import resize_rows


def to_output(
    tensor: torch.Tensor, plan: TensorPlan, device: torch.device, lora: Sequence[torch.Tensor] = ()
) -> dict[str, torch.Tensor]:
    """The tensors the output file stores for it, contiguous, on the CPU (see `transform`)."""
    return {name: t.cpu().contiguous() for name, t in transform(tensor, plan, device, lora).items()}


def row_group(plan: TensorPlan) -> int:
    """Rows that must stay together when the tensor goes through in blocks of rows (1, or the recipe's tile
    height); 0 when it cannot (a LoRA merge, a rotary permutation or a vocabulary resize needs the whole
    tensor, and so do recipes without a row group). Pure."""
    if plan.lora is not None or plan.rope_heads is not None or plan.resize is not None or len(plan.shape) < 1:
        return 0
    if plan.quant is None:
        return 1
    from distfinalize.transform.quant.recipes import get_recipe

    return get_recipe(plan.quant).row_group


def transform(
    tensor: torch.Tensor,
    plan: TensorPlan,
    device: torch.device,
    lora: Sequence[torch.Tensor] = (),
    start: int | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors the output file stores for it: a LoRA adapter (`lora`: A, B) merged in float32, rows permuted
    and resized, then cast (or quantized), left on `device`. With `start`, `tensor` is the block of rows from that
    row on (a tensor whose `row_group` is not 0), and so are the outputs. Runs on: the rank that writes the
    tensor, on its device."""
    if device.type != "cpu":
        tensor = tensor.to(device, non_blocking=True)
    if start is not None:
        if plan.quant is None:
            return {plan.name: tensor.to(plan.dtype)}
        from distfinalize.transform.quant.recipes import get_recipe

        return get_recipe(plan.quant).quantize_rows(plan.name, tensor, start, plan.shape)
    if plan.lora is not None:
        tensor = merge_lora(tensor, *lora, plan.lora)
    if plan.rope_heads is not None:
        tensor = rope_to_hf(tensor, plan.rope_heads)
    if plan.resize is not None:
        tensor = resize_rows(tensor, plan.resize)
    if plan.quant is not None:
        from distfinalize.transform.quant.recipes import get_recipe

        outputs = get_recipe(plan.quant).quantize(plan.name, tensor, plan.dtype)
    else:
        outputs = {plan.name: tensor.to(plan.dtype)}
    return outputs
