"""The process group and its store: forming the group, picking the device, naming backend errors, telling whether a
peer's process is still alive.
"""

from __future__ import annotations

import datetime
import logging
import os
import pickle
import re
from typing import Any

import torch
import torch.distributed as dist

from distfinalize.dist.launch import LaunchEnv
from distfinalize.errors import DistfinalizeError, LaunchError


def _init_group(launch: LaunchEnv, device: torch.device, timeout_s: float) -> None:
    """gloo on CPU; NCCL for CUDA tensors plus gloo for CPU objects on GPUs. Runs on: all ranks."""
    backend = "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"
    kwargs: dict[str, Any] = {}
    if launch.init_method is not None:
        kwargs["init_method"] = launch.init_method
    try:
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(seconds=timeout_s),
            rank=launch.rank,
            world_size=launch.world_size,
            **kwargs,
        )
    except (RuntimeError, ValueError) as exc:
        where = launch.init_method or f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        raise LaunchError(
            f"rank {launch.rank} of {launch.world_size} cannot join the process group ({launch.launcher})",
            where=f"{where}: {_short(exc)}",
            hint="check that every rank runs and reaches MASTER_ADDR:MASTER_PORT (set MASTER_PORT to a free port)",
        ) from exc


def join_group(device: torch.device, timeout_s: float) -> Any:
    """distfinalize's own group over every rank of a group that is already there (a training job's): gloo for
    CPU collectives (the job's may be NCCL only), NCCL too on GPUs, and distfinalize's timeout rather than the
    job's. Ranks keep their numbers. Runs on: all ranks of the job's group, together."""
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    return dist.new_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))


def _short(exc: BaseException) -> str:
    """The gist of a backend error: first line, without gloo's source location and advice."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", text)
    return text.split(". This is typically")[0][:300]


def _default_store() -> Any:
    """The store of the default process group (torchrun's agent store, or rank 0's TCPStore), if reachable."""
    if not dist.is_initialized():
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None


def _relabel_logging(launch: LaunchEnv) -> None:
    """The CLI set up logging from RANK/WORLD_SIZE before srun's variables were read: redo it with the rank."""
    from distfinalize.logs import setup_logging

    level = logging.getLevelName(logging.getLogger("distfinalize").getEffectiveLevel()).lower()
    setup_logging(level if level in ("debug", "info", "warning", "error") else "info", launch.rank, launch.world_size)


def gpus_shared() -> bool:
    """Whether this node runs more ranks than it has GPUs (LOCAL_WORLD_SIZE from torchrun and the elastic agent,
    SLURM_NTASKS_PER_NODE under srun). NCCL refuses two ranks on one GPU, so such ranks exchange over gloo, through
    the CPU. Runs on: every rank on a GPU."""
    per_node = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE", "")
    per_node = per_node.split("(")[0]  # srun writes "8(x2)" for two nodes of 8
    return per_node.isdigit() and int(per_node) > max(1, torch.cuda.device_count())


def wire_device(device: torch.device) -> torch.device:
    """Where exchanged buffers travel: this rank's GPU (over NCCL), or the CPU (over gloo) on the CPU and where
    ranks share a GPU. Runs on: every rank."""
    return device if device.type == "cuda" and not gpus_shared() else torch.device("cpu")


def _pick_device(device: str, local_rank: int) -> torch.device:
    """auto: this rank's GPU (cuda:LOCAL_RANK) when there is one, else the CPU."""
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DistfinalizeError(
            "--device cuda was asked for but torch sees no CUDA device",
            hint="use --device auto or --device cpu",
        )
    return torch.device("cuda", local_rank % torch.cuda.device_count())


SCATTER_WINDOW = 32  # sends rank 0 keeps in flight while scattering: its extra memory is this many parts


def scatter_object(objs: list[Any] | None, world_size: int, is_rank0: bool, group: Any = None) -> Any:
    """Item r of rank 0's `objs` on rank r: rank 0 pickles each part and sends it to its rank alone, a size then
    the bytes, a window of ranks at a time; so every rank receives only its own part's bytes (no padding to the
    largest) and rank 0 holds at most SCATTER_WINDOW pickled parts beside `objs`. Runs on: all ranks together
    (DistContext.run_step with scatter=True)."""
    if world_size == 1:
        return objs[0] if objs else None
    if not is_rank0:
        size = torch.zeros(1, dtype=torch.int64)
        dist.recv(size, group_src=0, group=group, tag=_SIZE_TAG)
        data = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.recv(data, group_src=0, group=group, tag=_DATA_TAG)
        return pickle.loads(memoryview(data.numpy()))
    assert objs is not None and len(objs) == world_size
    in_flight: list[tuple[Any, ...]] = []
    for rank in range(1, world_size):
        data = torch.frombuffer(
            bytearray(pickle.dumps(objs[rank], protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8
        )
        size = torch.tensor([data.numel()], dtype=torch.int64)
        sends = [
            dist.isend(t, group_dst=rank, group=group, tag=tag) for t, tag in ((size, _SIZE_TAG), (data, _DATA_TAG))
        ]
        in_flight.append((size, data, *sends))
        if len(in_flight) >= SCATTER_WINDOW:
            _wait(in_flight.pop(0))
    for sent in in_flight:
        _wait(sent)
    return objs[0]


_SIZE_TAG, _DATA_TAG = 71, 72


def _wait(sent: tuple[Any, ...]) -> None:
    for work in sent[2:]:
        if work is not None:
            work.wait()
