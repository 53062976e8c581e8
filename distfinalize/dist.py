"""DistContext: all process-group work in one place.

torchrun (RANK/WORLD_SIZE/LOCAL_RANK), or a single process with no process group at all.
Metadata collectives go over gloo; they raise on every rank when any rank failed.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from distfinalize.errors import DistfinalizeError, RankFailure

log = logging.getLogger(__name__)
T = TypeVar("T")
CPU = torch.device("cpu")


@dataclass(frozen=True)
class RankOutcome:
    """What one rank reports at the end of a step: a value, or an error message."""

    rank: int
    value: Any = None
    error: str | None = None


@dataclass
class DistContext:
    """Rank, world size and device of this process, and the collectives the pipeline uses."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = CPU
    owns_group: bool = False

    @classmethod
    def from_env(cls, device: str = "auto", timeout_s: float = 1800.0) -> DistContext:
        """Join the job torchrun started, or stand alone. Runs on: all ranks."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch_device = _pick_device(device, local_rank)
        owns_group = False
        if world_size > 1 and not dist.is_initialized():
            dist.init_process_group(
                backend="gloo", timeout=datetime.timedelta(seconds=timeout_s), rank=rank, world_size=world_size
            )
            owns_group = True
        return cls(rank, world_size, local_rank, torch_device, owns_group)

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    def all_gather_object(self, obj: T) -> list[T]:
        """Every rank's object, in rank order. No-op at world size 1."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: T, src: int = 0) -> T:
        """`obj` from rank `src` on every rank. No-op at world size 1."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def run_step(self, step: str, fn: Callable[[], T], *, ranks: str = "all") -> list[T]:
        """Run `fn` (on every rank, or only rank 0 with ranks="rank0") and agree on the outcome.

        Returns every rank's result in rank order. When any rank raised, every rank raises: the failing
        rank its own error, the others a RankFailure naming the failed rank and step. Runs on: all ranks.
        """
        outcome = RankOutcome(self.rank)
        own_error: BaseException | None = None
        if ranks == "all" or self.is_rank0:
            try:
                outcome = RankOutcome(self.rank, value=fn())
            except SystemExit:
                raise
            except BaseException as exc:  # DCP's CheckpointException derives from BaseException
                own_error = exc
                outcome = RankOutcome(self.rank, error=str(exc) or type(exc).__name__)
        outcomes = self.all_gather_object(outcome)
        failed = [o for o in outcomes if o.error is not None]
        if own_error is not None:
            if isinstance(own_error, DistfinalizeError) and self.rank != 0 and outcomes[0].error == outcome.error:
                own_error.shown_by_rank0 = True
            raise own_error
        if failed:
            first = failed[0]
            others = f" (and {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
            raise RankFailure(f"rank {first.rank} failed during {step}{others}", where=first.error)
        return [o.value for o in outcomes]

    def close(self) -> None:
        """Tear down the process group this context created."""
        if self.owns_group and dist.is_initialized():
            try:
                dist.barrier()  # tearing down gloo while a peer is still in a collective aborts the peer
            except (RuntimeError, dist.DistBackendError) as exc:
                log.debug("barrier before teardown failed: %s", exc)
            dist.destroy_process_group()


def _pick_device(device: str, local_rank: int) -> torch.device:
    """auto: this rank's GPU when there is one, else the CPU."""
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DistfinalizeError(
            "--device cuda was asked for but torch sees no CUDA device",
            hint="use --device auto or --device cpu",
        )
    return torch.device("cuda", local_rank % torch.cuda.device_count())
