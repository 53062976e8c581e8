"""Assemble a tensor on the rank's device, resize and cast it as planned, and bring it back for writing."""

from __future__ import annotations

import torch

from distfinalize.plan import TensorPlan
from distfinalize.transform.rope import rope_to_hf
from distfinalize.transform.vocab import resize_rows


def to_output(tensor: torch.Tensor, plan: TensorPlan, device: torch.device) -> torch.Tensor:
    """The tensor as the output file stores it: rows resized, planned dtype, contiguous, on the CPU.

    Runs on: the rank that writes the tensor, on its device.
    """
    if device.type != "cpu":
        tensor = tensor.to(device, non_blocking=True)
    if plan.rope_heads is not None:
        tensor = rope_to_hf(tensor, plan.rope_heads)
    if plan.resize is not None:
        tensor = resize_rows(tensor, plan.resize)
    tensor = tensor.to(plan.dtype)
    return tensor.cpu().contiguous()
