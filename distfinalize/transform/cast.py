"""Assemble a tensor on the rank's device, cast it to its planned dtype, and bring it back for writing."""

from __future__ import annotations

import torch

from distfinalize.plan import TensorPlan


def to_output(tensor: torch.Tensor, plan: TensorPlan, device: torch.device) -> torch.Tensor:
    """The tensor as the output file stores it: planned dtype, contiguous, on the CPU. Runs on: each rank."""
    if device.type != "cpu":
        tensor = tensor.to(device, non_blocking=True)
    tensor = tensor.to(plan.dtype)
    return tensor.cpu().contiguous()
