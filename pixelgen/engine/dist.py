"""Distributed set-up from torch's standard environment variables.

Whoever launches the process (the pipeline's SLURM/submitit layer, torchrun, or nobody) is responsible for
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; a bare process is a world of one.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (gloo on the CPU, nccl on GPUs); idempotent."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if os.environ["WORLD_SIZE"] != "1":
            raise RuntimeError("MASTER_PORT is not set but WORLD_SIZE > 1: the launcher must set it for all ranks")
        os.environ["MASTER_PORT"] = str(_free_port())
    accel = get_accelerator()
    on_gpu = accel.device_name() == "cuda"
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
